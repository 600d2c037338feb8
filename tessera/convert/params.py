"""Apply a family's rules to whole parameter trees: HF tensors -> sharded tessera params -> HF.

``plan`` expands the rules over the model's layers into ``Placement``s: each fills one or more
tessera parameters, from one HF tensor per stacked layer (prefix blocks are HF layers
``0..P-1``; scanned stacks hold the repeats of the block pattern on a leading axis: HF layer
``P + r * len(pattern) + j`` is slice ``r`` of block ``j``; a tied rule reads every layer's copy
of one parameter).
Every parameter of the model must be filled exactly once; that is checked before any tensor is
read, and so are the names and shapes of the HF tensors.

Several processes (a multi-host mesh): an import reads on each process only the blocks of the HF
tensors that its devices' shards need (``read_params``); an export gathers each HF tensor to the
one process that writes it (``hf_tensors`` with ``owners``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.mapping import Family, Index, Rule, Shape, bounds
from tessera.convert.safetensors_io import SafetensorsReader
from tessera.distributed import to_host
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


def cast(x: np.ndarray, dtype: Any, name: str, origin: Sequence[int] = ()) -> np.ndarray:
    """``x`` as ``dtype``; a finite value that becomes inf (e.g. > 65504 to float16) is an error
    naming the tensor and the value's index in it (``x`` is the block at ``origin``)."""
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
            at = tuple(i + o for i, o in itertools.zip_longest(where, origin, fillvalue=0))
            raise ConversionError(
                f"tensor {name}: value {float(x[where])} at index {at} overflows {dtype} "
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
    checkpoint, one parameter at a time. Each process reads only what its devices' shards
    need: for each distinct shard, the block of every HF tensor it draws from (the stacked layer
    and expert axes pick tensors, ``Transform.region`` the block of one), so on a multi-host
    mesh a parameter sharded over the hosts is read about once in all, not once per host."""
    shapes, shardings = flatten(shapes), flatten(shardings)
    placements = plan(family, model, shapes)
    check_checkpoint(reader, family, placements, shapes)
    out = {}
    for pl in placements:
        layer_shapes = pl.layer_shapes(shapes)
        for k, path in enumerate(pl.paths):
            shape, dtype = shapes[path].shape, np.dtype(shapes[path].dtype)
            out[path] = jax.make_array_from_callback(
                shape, shardings[path], _shard_reader(reader, pl, k, layer_shapes, shape, dtype)
            )
    return unflatten(out)


def _shard_reader(
    reader: SafetensorsReader,
    pl: Placement,
    k: int,
    layer_shapes: list[Shape],
    shape: Shape,
    dtype: np.dtype,
) -> Callable[[Index], np.ndarray]:
    """The ``make_array_from_callback`` callback of parameter ``pl.paths[k]`` (of ``shape``):
    its values at an index, read once per distinct index (devices that hold the same shard
    share it)."""
    lead = int(pl.stacked) + int(pl.experts > 0)  # axes that pick HF tensors
    names_at = defaultdict(list)
    for i in range(len(pl.hf_names)):
        names_at[pl.slot(i)].append(pl.hf_names[i])
    done: dict[tuple, np.ndarray] = {}

    def read(index: Index) -> np.ndarray:
        spans = bounds(index, shape)
        key = tuple(spans)
        if key in done:
            return done[key]
        block, finish = pl.rule.transform.region(layer_shapes, k, index[lead:])
        origin = [s.start for s in block]
        lead_ranges = [range(a, b) for a, b in spans[:lead]]
        alloc = np.zeros if None in pl.hf_names else np.empty  # zeros where a layer has none
        out = alloc([b - a for a, b in spans], dtype)
        for slot in itertools.product(*lead_ranges):
            where = tuple(i - r.start for i, r in zip(slot, lead_ranges))
            names = names_at[slot]
            for j, name in enumerate(names):
                if name is None:
                    continue
                value = finish(cast(reader.read(name, block), dtype, name, origin))
                if j and not np.array_equal(out[where], value):  # a tied rule's copies
                    raise ConversionError(
                        f"tensor {name} differs from {names[0]}: tessera shares one "
                        f"{path_str(pl.paths[k])} across layers"
                    )
                out[where] = value
        done[key] = out
        return out

    return read


def hf_shapes(params: PyTree, family: Family, model: ConfigDict) -> list[tuple[str, Shape]]:
    """``(HF name, shape)`` of every tensor ``hf_tensors`` yields, in its order."""
    flat = flatten(params)
    return [
        (name, pl.rule.transform.hf_shape(pl.layer_shapes(flat)))
        for pl in plan(family, model, flat)
        for name in pl.hf_names
        if name is not None
    ]


def hf_tensors(
    params: PyTree,
    family: Family,
    model: ConfigDict,
    dtype: Any,
    owners: Mapping[str, int] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF name, array as dtype)`` for every tensor of the HF checkpoint of ``params``; with
    ``owners`` (HF name -> process index) only for the tensors this process owns.

    A parameter whose devices are all this process's is fetched whole. One that spans other
    processes' devices is gathered one HF tensor (one layer's slice) at a time, by a collective
    every process joins in the same order (so every process must run this to the end), and
    only the owner converts and keeps it: a host holds at most one HF tensor of such a
    parameter. The gather is an all-gather (``process_allgather``): jax has no cross-host
    transfer to one process on every backend (CPU lacks it), so each tensor transits every
    host once, one at a time."""
    flat = flatten(params)
    me = jax.process_index()
    for pl in plan(family, model, flat):
        local = all(flat[p].is_fully_addressable for p in pl.paths)
        hosts = [to_host(flat[p]) for p in pl.paths] if local else []
        for i, name in enumerate(pl.hf_names):
            if name is None:
                continue
            mine = owners is None or owners[name] == me
            if local:
                values = [h[pl.slot(i)] for h in hosts]
            else:
                values = [to_host(flat[p][pl.slot(i)]) for p in pl.paths]
            if mine:
                yield name, cast(np.ascontiguousarray(pl.rule.transform.to_hf(values)), dtype, name)
