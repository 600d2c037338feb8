"""Device mesh from ``config.mesh``: axes ``data, fsdp, expert, sequence, tensor`` (outer first)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from tessera.configs.base import ConfigDict

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")


def _fill(sizes: list[int], total: int, what: str) -> list[int]:
    """Replace the one -1 in ``sizes`` so their product is ``total``; errors name the mismatch."""
    auto = [i for i, s in enumerate(sizes) if s == -1]
    if len(auto) > 1:
        raise ValueError(
            f"mesh: at most one {what} axis may be -1, got {dict(zip(MESH_AXES, sizes))}"
        )
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh: {what} sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if auto:
        if total % known:
            raise ValueError(
                f"mesh: {what} sizes {dict(zip(MESH_AXES, sizes))} do not divide {total} devices"
            )
        sizes = list(sizes)
        sizes[auto[0]] = total // known
    elif known != total:
        raise ValueError(
            f"mesh: {what} sizes {dict(zip(MESH_AXES, sizes))} multiply to {known}, "
            f"but there are {total} devices"
        )
    return sizes


def mesh_shape(mesh_cfg: ConfigDict, num_devices: int, num_slices: int = 1) -> dict[str, int]:
    """Resolved per-axis sizes (ICI x DCN) for ``num_devices`` devices in ``num_slices`` slices."""
    dcn = _fill([int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES], num_slices, "DCN")
    if num_devices % num_slices:
        raise ValueError(f"mesh: {num_devices} devices do not split into {num_slices} slices")
    ici = _fill([int(mesh_cfg[a]) for a in MESH_AXES], num_devices // num_slices, "ICI")
    return {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}


def _physical(create, *args):
    """``create(*args)`` (a ``mesh_utils`` builder that lays the logical axes on the chips' torus)
    and, when no axis of the logical mesh is a product of whole physical axes (``expert=8`` on a
    16 x 16 v6e-256: 8 is no product of 16s), the same with physical axes split between logical
    ones, which jax permits on request: every shape that multiplies to the device count builds."""
    try:
        return create(*args)
    except NotImplementedError:
        return create(*args, allow_split_physical_axes=True)


def make_mesh(mesh_cfg: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the named mesh; on multi-slice TPU the DCN axes span slices (hybrid mesh)."""
    devices = list(devices if devices is not None else jax.devices())
    slices = {getattr(d, "slice_index", 0) for d in devices}
    num_slices = len(slices)
    shape = mesh_shape(mesh_cfg, len(devices), num_slices)
    if num_slices > 1:
        from jax.experimental import mesh_utils

        dcn = _fill([int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES], num_slices, "DCN")
        ici = [shape[a] // d for a, d in zip(MESH_AXES, dcn)]
        arr = _physical(mesh_utils.create_hybrid_device_mesh, ici, dcn, devices)
    elif devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        arr = _physical(mesh_utils.create_device_mesh, [shape[a] for a in MESH_AXES], devices)
    else:
        arr = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)
