"""Apply a family's rules to whole parameter trees: HF tensors -> sharded tessera params -> HF.

``plan`` expands the rules over the model's layers into ``Placement``s: each fills one or more
tessera parameters, from one HF tensor per stacked layer (prefix blocks are HF layers
``0..P-1``; scanned stacks hold the repeats of the block pattern on a leading axis: HF layer
``P + r * len(pattern) + j`` is slice ``r`` of block ``j``; a tied rule reads every layer's copy
of one parameter).
Every parameter of the model must be filled exactly once; that is checked before any tensor is
read, and so are the names and shapes of the HF tensors.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.mapping import Family, Rule, Shape
from tessera.convert.safetensors_io import SafetensorsReader
from tessera.models.layout import parse_layout

PyTree = Any
Path = tuple[str | int, ...]


def flatten(tree: PyTree, prefix: Path = ()) -> dict[Path, Any]:
    """Nested dicts -> {path tuple: leaf}."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, (*prefix, key)))
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def path_str(path: Path) -> str:
    return "/".join(str(k) for k in path)


@dataclasses.dataclass(frozen=True)
class Placement:
    """``rule`` filling tessera ``paths``: from ``hf_names[r]`` into slice ``r`` when stacked,
    else from the one name (a tied rule: from each of its names, all equal). A per-expert rule
    (``experts`` > 0) reads one HF tensor per expert: ``hf_names[r * experts + e]`` fills slice
    ``[r, e]`` (stacked) or ``[e]``. A name None (a layer in ``rule.absent``) fills zeros and
    exports nothing."""

    rule: Rule
    paths: tuple[Path, ...]
    hf_names: tuple[str | None, ...]
    stacked: bool
    experts: int = 0

    def layer_shapes(self, shapes: Mapping[Path, Any]) -> list[Shape]:
        """The shapes one HF tensor fills: without the stacked layer axis and the expert axis."""
        drop = int(self.stacked) + int(self.experts > 0)
        return [tuple(shapes[p].shape[drop:]) for p in self.paths]

    def slot(self, i: int) -> tuple[int, ...]:
        """Where the values of ``hf_names[i]`` go in each parameter."""
        if self.experts:
            r, e = divmod(i, self.experts)
            return (r, e) if self.stacked else (e,)
        return (i,) if self.stacked else ()


def _split(path: str) -> Path:
    return tuple(path.split("/"))


def plan(family: Family, model: ConfigDict, shapes: Mapping[Path, Any]) -> list[Placement]:
    """The placements of ``family``'s rules for ``model`` (config) with flat param ``shapes``."""
    layout = parse_layout(model)
    placements, filled = [], {}
    for rule in family.rules:
        targets = [_split(o) for o in rule.ours]
        if not rule.per_layer:
            groups = [((), (rule.hf,), False)]
        elif rule.tied:  # one parameter, a copy in every HF layer
            groups = [((), tuple(rule.layer_name(i) for i in range(len(layout.layers()))), False)]
        else:
            groups = [
                (("prefix", i), (rule.layer_name(i),), False)
                for i, spec in enumerate(layout.prefix)
                if rule.applies_to(spec)
            ]
            for j, spec in enumerate(layout.pattern):
                if not rule.applies_to(spec):
                    continue
                names = [rule.layer_name(layout.layer_index(j, r)) for r in range(layout.repeats)]
                if model.scan_layers:
                    groups.append((("units", "blocks", j), tuple(names), True))
                else:
                    groups += [
                        (("units", r, "blocks", j), (n,), False) for r, n in enumerate(names)
                    ]
        for prefix, names, stacked in groups:
            paths = tuple((*prefix, *t) for t in targets)
            present = [p in shapes for p in paths]
            if not any(present):
                continue
            if not all(present):
                missing = path_str(paths[present.index(False)])
                raise ConversionError(
                    f"model_type {family.model_type}: rule for {rule.hf} fills {missing}, "
                    "which this model does not have"
                )
            experts = 0
            if rule.per_expert:  # the expert axis follows the stacked layer axis
                experts = int(shapes[paths[0]].shape[int(stacked)])
                names = tuple(
                    n and n.replace("{expert}", str(e)) for n in names for e in range(experts)
                )
            for p in paths:
                if p in filled:
                    raise ConversionError(
                        f"model_type {family.model_type}: tessera parameter {path_str(p)} is "
                        f"filled by both {filled[p]} and {rule.hf}"
                    )
                filled[p] = rule.hf
            placements.append(Placement(rule, paths, names, stacked, experts))
    unfilled = [path_str(p) for p in shapes if p not in filled]
    if unfilled:
        raise ConversionError(
            f"model_type {family.model_type}: no rule fills tessera parameter {unfilled[0]}"
            + (f" (and {len(unfilled) - 1} more)" if len(unfilled) > 1 else "")
        )
    return placements


def cast(x: np.ndarray, dtype: Any, name: str) -> np.ndarray:
    """``x`` as ``dtype``; a finite value that becomes inf (e.g. > 65504 to float16) is an error
    naming the tensor."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    with np.errstate(over="ignore"):
        y = x.astype(dtype)
    floats = jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating)
    if floats and jnp.finfo(dtype).max < jnp.finfo(x.dtype).max:
        bad = np.isfinite(x) & ~np.isfinite(y)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ConversionError(
                f"tensor {name}: value {float(x[where])} at index {where} overflows {dtype} "
                f"(largest finite value {float(jnp.finfo(dtype).max)})"
            )
    return y


def check_checkpoint(
    reader: SafetensorsReader,
    family: Family,
    placements: list[Placement],
    shapes: Mapping[Path, Any],
) -> None:
    """Every tensor the placements read exists with the right shape, and every tensor of the
    checkpoint is read (or ignorable) — before anything is loaded."""
    used = set()
    for pl in placements:
        want = pl.rule.transform.hf_shape(pl.layer_shapes(shapes))
        for name in filter(None, pl.hf_names):
            used.add(name)
            if name not in reader:
                raise ConversionError(
                    f"missing tensor {name} in {reader.directory} (model_type "
                    f"{family.model_type} with this config needs it for "
                    f"{path_str(pl.paths[0])})"
                )
            got = reader.shape(name)
            if got != want:
                raise ConversionError(
                    f"shape mismatch for tensor {name}: the checkpoint has {got}, config.json "
                    f"implies {want}"
                )
    extra = [
        n
        for n in reader.names
        if n not in used and not any(fnmatch.fnmatchcase(n, p) for p in family.ignore)
    ]
    if extra:
        raise ConversionError(
            f"unexpected tensor {extra[0]} in {reader.directory}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + f": model_type {family.model_type} with this config has no parameter for it"
        )


def read_params(
    reader: SafetensorsReader,
    family: Family,
    model: ConfigDict,
    shapes: PyTree,
    shardings: PyTree,
) -> PyTree:
    """Tessera params (tree like ``shapes``, each array placed with its sharding) from an HF
    checkpoint, one parameter at a time: a stacked parameter is assembled on the host from its
    layers' tensors, then placed; nothing else of the model is held on the host meanwhile."""
    shapes, shardings = flatten(shapes), flatten(shardings)
    placements = plan(family, model, shapes)
    check_checkpoint(reader, family, placements, shapes)
    out = {}
    for pl in placements:
        layer_shapes = pl.layer_shapes(shapes)
        # Every slice is written, except the zeros of layers where the tensor is absent.
        alloc = np.zeros if None in pl.hf_names else np.empty
        buffers = [alloc(shapes[p].shape, shapes[p].dtype) for p in pl.paths]
        dtype = buffers[0].dtype
        for i, name in enumerate(pl.hf_names):
            if name is None:
                continue
            values = pl.rule.transform.to_ours(cast(reader.get(name), dtype, name), layer_shapes)
            if pl.rule.tied and i and not all(map(np.array_equal, buffers, values)):
                raise ConversionError(
                    f"tensor {name} differs from {pl.hf_names[0]}: tessera shares one "
                    f"{path_str(pl.paths[0])} across layers"
                )
            for buffer, value in zip(buffers, values):
                buffer[pl.slot(i)] = value
        for path, buffer in zip(pl.paths, buffers):
            out[path] = jax.make_array_from_callback(
                buffer.shape, shardings[path], lambda index, b=buffer: b[index]
            )
    return unflatten(out)


def hf_tensors(
    params: PyTree, family: Family, model: ConfigDict, dtype: Any
) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF name, array as dtype)`` for every tensor of the HF checkpoint of ``params``."""
    flat = flatten(params)
    for pl in plan(family, model, flat):
        hosts = [np.asarray(jax.device_get(flat[p])) for p in pl.paths]
        for i, name in enumerate(pl.hf_names):
            if name is None:
                continue
            values = [h[pl.slot(i)] for h in hosts]
            yield name, cast(np.ascontiguousarray(pl.rule.transform.to_hf(values)), dtype, name)
