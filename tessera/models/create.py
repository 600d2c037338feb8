"""Build a model's parameters directly on the mesh, and move between NNX modules and pure trees.

Training and decoding work on a *pure* parameter tree (nested dicts of arrays): it is what optax,
orbax and ``jax.jit`` shardings see. ``merge`` turns it back into a module inside jitted code.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from ml_collections import FrozenConfigDict

from tessera.configs.base import ConfigDict
from tessera.models.layout import layer_mixers
from tessera.models.registry import build_model
from tessera.models.updates import RuleTarget, rule_targets
from tessera.sharding import logical_to_spec, variable_names

PyTree = Any
_WARNED: set[str] = set()  # warnings given once per process


def abstract_arrays(shapes: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying shardings: restore targets and AOT compilation inputs."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


class ModelSpec:
    """A model's graph definition plus the shape, dtype and logical axes of every parameter."""

    def __init__(self, model_cfg: ConfigDict):
        self.cfg = model_cfg
        abstract = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_state = nnx.split(abstract)
        self.axis_names: PyTree = nnx.to_pure_dict(
            self.abstract_state, extract_fn=lambda v: variable_names(v)
        )
        self.shapes: PyTree = nnx.to_pure_dict(
            self.abstract_state, extract_fn=lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype)
        )

    def shardings(
        self, mesh: Mesh, rules: Mapping[str, tuple[str, ...]], *, strict: bool = False
    ) -> PyTree:
        """NamedSharding for every parameter, from its logical axes and the rules table.

        A rule whose mesh axes do not divide a parameter's dimension leaves that dimension
        replicated over them: a warning names the parameter, logical axis, mesh axes and size
        (once per process); ``strict`` (``config.mesh.strict``) makes it a ValueError.
        """
        sizes = dict(mesh.shape)
        self.check_mesh(sizes, rules)
        flat = jax.tree_util.tree_flatten_with_path(
            self.axis_names, is_leaf=lambda x: isinstance(x, tuple)
        )[0]
        shapes = jax.tree.leaves(self.shapes)
        out, problems = [], []
        for (path, names), shape in zip(flat, shapes, strict=True):
            dropped: list = []
            spec = logical_to_spec(names, rules, sizes, shape.shape, dropped)
            out.append(NamedSharding(mesh, spec))
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            problems += [
                f"parameter {name} axis {logical!r} (size {size}) is not divisible by mesh "
                f"axes {'x'.join(axes)} = {math.prod(sizes[a] for a in axes)}"
                for logical, axes, size in dropped
            ]
        if problems:
            if strict:
                raise ValueError(f"mesh.strict: {problems[0]}" + (
                    f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
            for problem in problems:
                if problem not in _WARNED:
                    _WARNED.add(problem)
                    warnings.warn(
                        f"{problem}: replicated over them (mesh.strict=True makes this an error)",
                        stacklevel=2,
                    )
        return jax.tree.unflatten(jax.tree.structure(self.shapes), out)

    def check_mesh(self, sizes: Mapping[str, int], rules: Mapping[str, tuple[str, ...]]) -> None:
        """Each mixer's own requirements on the mesh (``check_mesh(cfg, sizes, rules)`` of its
        class, e.g. MoE's experts divisible by the expert axis): a ValueError naming the keys."""
        if "pattern" not in self.cfg:
            return
        for cfg, classes in layer_mixers(self.cfg):
            for cls in classes.values():
                if cls is not None and hasattr(cls, "check_mesh"):
                    cls.check_mesh(cfg, dict(sizes), dict(rules))

    @functools.cached_property
    def rule_targets(self) -> list[RuleTarget]:
        """The parameters updated by a rule after each train step instead of by the optimizer
        (``models/updates.py``)."""
        return rule_targets(self.cfg, self.shapes)

    def abstract(self, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> PyTree:
        """ShapeDtypeStructs with shardings (restore targets, AOT compilation inputs)."""
        return abstract_arrays(self.shapes, self.shardings(mesh, rules))

    def init(self, seed: int, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> PyTree:
        """Random parameters, created already sharded (never materialised on one device)."""

        def make() -> PyTree:
            model = build_model(self.cfg, rngs=nnx.Rngs(seed))
            return nnx.to_pure_dict(nnx.state(model))

        return jax.jit(make, out_shardings=self.shardings(mesh, rules))()

    def merge(self, params: PyTree) -> nnx.Module:
        """A module whose parameters are ``params`` (a pure tree, possibly of tracers)."""
        state = jax.tree.map(lambda x: x, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    @property
    def scanned(self) -> bool:
        """Whether the layer stack is scanned (parameters under ``units`` with a leading
        ``layers`` axis)."""
        return bool(self.cfg.get("scan_layers", False)) and "units" in self.shapes

    def unrolled(self) -> ModelSpec:
        """The same model with its stack unrolled (``scan_layers=False``): parameters
        ``units/<r>/...`` and one cache array per layer. ``self`` when it is not scanned."""
        if not self.scanned:
            return self
        if isinstance(self.cfg, FrozenConfigDict):
            cfg = ConfigDict(self.cfg)
            cfg.scan_layers = False
            return ModelSpec(FrozenConfigDict(cfg))
        cfg = copy.deepcopy(self.cfg)
        with cfg.unlocked():
            cfg.scan_layers = False
        return ModelSpec(cfg)

    def unstack(self, params: PyTree) -> PyTree:
        """This (scanned) model's parameters -> ``unrolled()``'s: ``units`` leaves [R, ...] become
        ``units/<r>/...`` leaves [...] (slices; shardings follow the arrays). Unchanged when the
        stack is not scanned."""
        if not self.scanned:
            return params
        units = params["units"]
        repeats = int(jax.tree.leaves(self.shapes["units"])[0].shape[0])
        split = {r: jax.tree.map(lambda a, r=r: a[r], units) for r in range(repeats)}
        return {**params, "units": split}

    def num_params(self) -> int:
        return sum(int(s.size) for s in jax.tree.leaves(self.shapes))
