"""The one table of logical-axis rules: logical array axis name -> mesh axes.

Layers name their axes logically (``embed``, ``heads``, ``mlp``, ...); only this table knows the
mesh. ``config.mesh.rules`` overrides entries, e.g. ``"mlp=tensor+fsdp;vocab="``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

MeshAxes = tuple[str, ...]

# The mesh axes a parameter is fully sharded over (FSDP / ZeRO-3): every axis that splits the
# batch except data (data-parallel replicas). ``embed`` splits over them, and every family
# gives each large parameter a dimension that does (tests/sharding: no preset keeps a large
# parameter whole on every device).
FSDP_AXES: MeshAxes = ("fsdp", "sequence", "expert")

DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": ("sequence",),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    # parameters
    # The expert axis splits the batch too (data parallel outside the experts), so the
    # parameters shard over it as over fsdp; an expert weight's expert dimension takes it first.
    "embed": FSDP_AXES,
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "norm": (),
    "layers": (),
    # caches
    "cache_batch": ("data", "fsdp", "expert"),
    "cache_length": (),
    "cache_kv_heads": ("tensor",),
}

# Rules of the logical names only one family uses, declared next to its code
# (``LOGICAL_RULES`` of a mixer class, registered by ``layers/mixers/__init__.py``; of
# ``layers/vision.py``, registered there).
_REGISTERED: dict[str, MeshAxes] = {}
_OWNERS: dict[str, str] = {}


def register_logical_rules(owner: str, rules: Mapping[str, Sequence[str]]) -> None:
    """Add ``owner``'s default rules; two owners may share a name only with the same mesh axes."""
    for name, axes in rules.items():
        axes = tuple(axes)
        if name in DEFAULT_RULES and DEFAULT_RULES[name] != axes:
            raise ValueError(
                f"{owner}: logical axis {name!r} is a shared name with rule {DEFAULT_RULES[name]}"
            )
        if name in _REGISTERED and _REGISTERED[name] != axes:
            raise ValueError(
                f"{owner}: logical axis {name!r} -> {axes} conflicts with {_OWNERS[name]}'s "
                f"{_REGISTERED[name]}"
            )
        _REGISTERED[name], _OWNERS[name] = axes, owner


def default_rules() -> dict[str, MeshAxes]:
    """The shared table plus every registered family's rules."""
    import tessera.layers.conv  # noqa: F401  (the image layers')
    import tessera.layers.mixers  # noqa: F401  (registers the mixers' rules)
    import tessera.layers.vision  # noqa: F401  (and the vision layers')

    return {**DEFAULT_RULES, **_REGISTERED}


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
    table = default_rules()
    unknown = set(extra) - set(table)
    if unknown:
        raise ValueError(f"mesh.rules: unknown logical axes {sorted(unknown)}")
    return {**table, **extra}


# (logical name, mesh axes it could not use, dimension size) for each dropped rule
Dropped = tuple[str, MeshAxes, int]


def logical_to_spec(
    names: Sequence[str | None],
    rules: Mapping[str, MeshAxes],
    mesh_sizes: Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
    dropped: list[Dropped] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array (first come, first served), axes of size 1 are
    dropped, and with ``shape`` given an axis that does not divide its dimension is dropped too, so
    small models (4 kv heads on tensor=8) still shard what they can instead of failing. Each such
    divisibility drop is appended to ``dropped`` (when given) so callers can report it.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes, skipped = [], []
        dim_left = None if shape is None else shape[i]
        for ax in rules.get(name, ()) if name else ():
            size = 1 if mesh_sizes is None else mesh_sizes.get(ax, 1)
            if ax in used or (mesh_sizes is not None and size == 1):
                continue
            if dim_left is not None:
                if dim_left % size:
                    skipped.append(ax)
                    continue
                dim_left //= size
            axes.append(ax)
            used.add(ax)
        if skipped and dropped is not None:
            dropped.append((name, tuple(skipped), int(shape[i])))
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)
