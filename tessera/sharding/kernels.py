"""Run a per-shard kernel under ``jax.shard_map`` over the active mesh, from logical axis names.

A Pallas kernel sees one device's block of its inputs. ``shard_map_kernel(fn, in_axes=...,
out_axes=...)`` maps it over the mesh made active by ``use_mesh``: each argument's logical names
become a PartitionSpec through the rules table, the kernel runs on the local blocks, and the
outputs are reassembled from their logical names. Without an active mesh it calls ``fn`` directly.

Every logical name resolves to the same mesh axes in every argument and output, so the blocks
line up: a mesh axis that does not divide every dimension carrying that name is dropped for all of
them (4 kv heads on tensor=8 stay whole). Dimensions that must split together need one logical
name: give q's and k's heads both ``act_heads`` for grouped-query attention, so that either both
split or neither does. An output name no input carries is never split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

from tessera.sharding.context import active
from tessera.sharding.rules import MeshAxes, logical_to_spec

LogicalAxes = Sequence[str | None]


def _axes(entry: str | tuple[str, ...] | None) -> MeshAxes:
    """One PartitionSpec entry as a tuple of mesh axes."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _kernel_rules(
    inputs: Sequence[tuple[LogicalAxes, Sequence[int]]],
    rules: Mapping[str, MeshAxes],
    sizes: Mapping[str, int],
    unsplit: Sequence[str],
) -> dict[str, MeshAxes]:
    """Mesh axes for each logical name of ``inputs`` ((names, shape) pairs), the same in all of
    them: the rules less ``unsplit``, narrowed until every dimension with a name splits over
    exactly that name's axes."""
    table = {
        name: tuple(ax for ax in rules.get(name, ()) if ax not in unsplit)
        for names, _ in inputs
        for name in names
        if name is not None
    }
    narrowed = True
    while narrowed:  # each pass only removes axes, so this ends
        narrowed = False
        for names, shape in inputs:
            for name, entry in zip(names, logical_to_spec(names, table, sizes, shape)):
                if name is not None and _axes(entry) != table[name]:
                    table[name] = _axes(entry)
                    narrowed = True
    return table


def _out_spec(names: LogicalAxes, table: Mapping[str, MeshAxes], sizes: Mapping[str, int]):
    """An output's PartitionSpec; a name no input carries stays whole."""
    spec = logical_to_spec(names, table, sizes)
    for name, entry in zip(names, spec):
        if name is not None and _axes(entry) != table.get(name, ()):
            raise ValueError(
                f"shard_map_kernel: output axes {tuple(names)} cannot split {name!r} over "
                f"{table[name]}, as the inputs do: another name of the output takes the mesh axis"
            )
    return spec


def _is_names(axes: Any) -> bool:
    return all(a is None or isinstance(a, str) for a in axes)


def shard_map_kernel(
    fn: Callable[..., Any],
    *,
    in_axes: Sequence[LogicalAxes],
    out_axes: LogicalAxes | Sequence[LogicalAxes],
    unsplit: Sequence[str] = (),
) -> Callable[..., Any]:
    """Wrap ``fn`` (a per-shard kernel) to run over the active mesh.

    in_axes: logical names per positional argument, one per dimension (e.g. q [B, T, H, D] is
      ``("batch", "length", "act_heads", None)``). An argument given as None reaches ``fn`` as
      None (its entry is ignored).
    out_axes: the names of the one output array, or a tuple of them for a tuple of outputs.
    unsplit: mesh axes ``fn`` must see whole (``("sequence",)`` for a kernel that needs the full
      sequence): inputs split over them are gathered (replicated) before ``fn`` runs, and outputs
      come back unsplit on them. Naming an axis the mesh lacks is a ValueError.

    ``fn`` runs under ``jax.shard_map(..., check_vma=False)``: it must compute each output block
    from the matching input blocks alone (no collectives); gradients flow through.
    """
    several = not _is_names(out_axes)

    def run(*args: jax.Array | None) -> Any:
        if len(args) != len(in_axes):
            raise ValueError(
                f"shard_map_kernel: {len(args)} arguments but {len(in_axes)} in_axes entries"
            )
        for i, (arg, names) in enumerate(zip(args, in_axes)):
            if arg is not None and len(names) != arg.ndim:
                raise ValueError(
                    f"shard_map_kernel: argument {i} has shape {arg.shape} but axis names "
                    f"{tuple(names)}"
                )
        ctx = active()
        if ctx is None:
            return fn(*args)
        mesh, rules = ctx
        missing = set(unsplit) - set(mesh.axis_names)
        if missing:
            raise ValueError(
                f"shard_map_kernel: unsplit axes {sorted(missing)} are not mesh axes "
                f"{mesh.axis_names}"
            )
        sizes = dict(mesh.shape)
        present = [i for i, arg in enumerate(args) if arg is not None]
        inputs = [(in_axes[i], args[i].shape) for i in present]
        table = _kernel_rules(inputs, rules, sizes, unsplit)
        in_specs = tuple(logical_to_spec(names, table, sizes, shape) for names, shape in inputs)
        if several:
            out_specs: PartitionSpec | tuple[PartitionSpec, ...] = tuple(
                _out_spec(names, table, sizes) for names in out_axes
            )
        else:
            out_specs = _out_spec(out_axes, table, sizes)

        def per_shard(*blocks: jax.Array) -> Any:
            full: list[jax.Array | None] = [None] * len(args)
            for i, block in zip(present, blocks):
                full[i] = block
            return fn(*full)

        mapped = jax.shard_map(
            per_shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
        return mapped(*(args[i] for i in present))

    return run
