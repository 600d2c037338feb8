"""The active mesh + rules, and helpers that turn logical names into shardings.

Layers call ``constrain(x, ("batch", "length", "act_embed"))``; outside ``use_mesh`` it is a
no-op, so the same model code runs unsharded on one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tessera.sharding.rules import MeshAxes, logical_to_spec, make_rules

_ACTIVE: list[tuple[Mesh, dict[str, MeshAxes]]] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: str | Mapping[str, MeshAxes] = "") -> Iterator[Mesh]:
    """Make ``mesh`` and the logical rules (defaults + overrides) active for model code."""
    _ACTIVE.append((mesh, make_rules(rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


def active() -> tuple[Mesh, dict[str, MeshAxes]] | None:
    return _ACTIVE[-1] if _ACTIVE else None


def logical_sharding(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] | None = None,
) -> NamedSharding:
    """NamedSharding for an array of ``shape`` whose axes have logical ``names``."""
    if mesh is None:
        ctx = active()
        if ctx is None:
            raise RuntimeError("logical_sharding needs a mesh: call inside sharding.use_mesh")
        mesh, rules = ctx
    spec = logical_to_spec(names, rules or make_rules(), dict(mesh.shape), shape)
    return NamedSharding(mesh, spec)


def is_axis_names(x: Any) -> bool:
    """Whether ``x`` is one array's logical axis names (a non-empty tuple of str / None): the
    ``is_leaf`` of trees of names, whose containers may themselves be (empty) tuples."""
    return isinstance(x, tuple) and bool(x) and all(n is None or isinstance(n, str) for n in x)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical axis names (no-op without a mesh)."""
    if not _ACTIVE:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for a {x.ndim}-d array")
    return jax.lax.with_sharding_constraint(x, logical_sharding(names, x.shape))


def variable_names(var: nnx.Variable) -> tuple[str | None, ...]:
    """Logical names of a variable's axes; stacked (scanned) leading axes are ``layers``."""
    names = tuple(var.get_metadata().get("logical_axes", ()) or ())
    ndim = len(var.shape)
    if len(names) < ndim:
        names = ("layers",) * (ndim - len(names)) + names
    return names if names else (None,) * ndim


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, MeshAxes]) -> Any:
    """Tree of NamedShardings for an ``nnx.State`` (or any tree of Variables / arrays)."""

    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nnx.Variable):
            names = variable_names(leaf)
            return NamedSharding(mesh, logical_to_spec(names, rules, dict(mesh.shape), leaf.shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
