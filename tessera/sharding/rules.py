"""The one table of logical-axis rules: logical array axis name -> mesh axes.

Layers name their axes logically (``embed``, ``heads``, ``mlp``, ...); only this table knows the
mesh. ``config.mesh.rules`` overrides entries, e.g. ``"mlp=tensor+fsdp;vocab="``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

MeshAxes = tuple[str, ...]

DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": ("sequence",),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "act_ssm_inner": ("tensor",),
    # parameters
    "embed": ("fsdp", "sequence"),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "norm": (),
    "layers": (),
    # state-space mixers (mamba, mamba2). mamba2's fused in-projection output (z | xBC | dt) and
    # conv channels (x | B | C) mix pieces of different kinds, so they are not split over tensor.
    "ssm_proj": (),
    "ssm_conv": (),
    "conv_width": (),
    "ssm_inner": ("tensor",),
    "ssm_heads": ("tensor",),
    "ssm_state": (),
    "ssm_branch": (),  # mamba: in_proj x | z
    "ssm_rank": (),  # mamba: dt rank
    # caches
    "cache_batch": ("data", "fsdp", "expert"),
    "cache_length": (),
    "cache_kv_heads": ("tensor",),
    "cache_ssm_heads": ("tensor",),
    "cache_ssm_inner": ("tensor",),
}


def parse_rules(text: str) -> dict[str, MeshAxes]:
    """``"mlp=tensor+fsdp;vocab="`` -> ``{"mlp": ("tensor", "fsdp"), "vocab": ()}``."""
    out: dict[str, MeshAxes] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        if "=" not in item:
            raise ValueError(f"mesh.rules entry {item!r} is not of the form logical=axis+axis")
        name, axes = item.split("=", 1)
        out[name.strip()] = tuple(a.strip() for a in axes.split("+") if a.strip())
    return out


def make_rules(overrides: str | Mapping[str, MeshAxes] = "") -> dict[str, MeshAxes]:
    """The default table with overrides applied; unknown logical names are an error."""
    extra = parse_rules(overrides) if isinstance(overrides, str) else dict(overrides)
    unknown = set(extra) - set(DEFAULT_RULES)
    if unknown:
        raise ValueError(f"mesh.rules: unknown logical axes {sorted(unknown)}")
    return {**DEFAULT_RULES, **extra}


def logical_to_spec(
    names: Sequence[str | None],
    rules: Mapping[str, MeshAxes],
    mesh_sizes: Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array (first come, first served), axes of size 1 are
    dropped, and with ``shape`` given an axis that does not divide its dimension is dropped too, so
    small models (4 kv heads on tensor=8) still shard what they can instead of failing.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = []
        dim_left = None if shape is None else shape[i]
        for ax in rules.get(name, ()) if name else ():
            size = 1 if mesh_sizes is None else mesh_sizes.get(ax, 1)
            if ax in used or (mesh_sizes is not None and size == 1):
                continue
            if dim_left is not None:
                if dim_left % size:
                    continue
                dim_left //= size
            axes.append(ax)
            used.add(ax)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)
