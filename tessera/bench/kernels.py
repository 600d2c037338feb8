"""What the kernel benches (`attention`, `recurrence`) share: the median run time of a compiled
step, XLA's cost of a compiled program, and the TPU mesh their AOT tables compile on."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def median_ms(compiled: Any, args: Sequence[jax.Array], repeats: int) -> float:
    """Median wall time in ms of ``repeats`` runs of ``compiled(*args)`` after one warm run."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def xla_cost(compiled: Any) -> tuple[float, float]:
    """XLA's (FLOPs, optimal_seconds) of a compiled program, read as ``tessera.aot`` reads them
    (``aot.analysis.cost``: optimal_seconds corrected for libtpu's -1 s per ConcatBitcast, NaN
    where XLA gives none)."""
    from tessera.aot import analysis

    cost = analysis.cost(compiled)
    return cost["flops"], cost["optimal_seconds"]


def tpu_mesh(devices: list) -> Any:
    """A mesh of tessera's axes over ``devices`` with all of them on ``data`` (the benches split
    the batch only)."""
    from jax.sharding import Mesh

    from tessera.sharding import MESH_AXES

    grid = np.array(devices).reshape(len(devices), *([1] * (len(MESH_AXES) - 1)))
    return Mesh(grid, MESH_AXES)
