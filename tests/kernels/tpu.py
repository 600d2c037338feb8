"""TPU AOT helpers the kernel tests share: the libtpu skip marker, a topology's target devices,
and the (data, tensor) mesh the kernels' sharded compiles use."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tessera.aot.topology import have_libtpu

needs_libtpu = pytest.mark.skipif(
    not have_libtpu(), reason="libtpu is not installed (pip install 'tessera[tpu]', Linux x86-64)"
)


def tpu_target(name: str):
    """The `tessera.aot` target of topology ``name`` ("v5e-4"): its devices, chip and HBM."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes hold its lock
    from tessera.aot.compile import make_target
    from tessera.aot.topology import parse_topology

    return make_target(parse_topology(name))


def data_tensor_mesh(name: str):
    """A mesh over topology ``name``'s devices with axes (data, tensor), tensor of size 2."""
    from jax.sharding import Mesh

    return Mesh(np.array(tpu_target(name).devices).reshape(-1, 2), ("data", "tensor"))
