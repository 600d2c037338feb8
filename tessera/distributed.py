"""Joining a multi-process run: ``jax.distributed.initialize`` from the environment.

Every process of a run executes the same command; the environment says how they meet:

- ``TESSERA_DISTRIBUTED=1``: join, letting jax detect the cluster (TPU VM slices, GKE, SLURM,
  Open MPI), as on a TPU pod where every host runs the command.
- ``TESSERA_COORDINATOR=host:port``, ``TESSERA_NUM_PROCESSES=N`` and ``TESSERA_PROCESS_ID=i``
  (set together, also without ``TESSERA_DISTRIBUTED``): join with these, as
  ``python -m tessera.launch local`` sets them for N processes on one machine.

On CPU several processes exchange collectives through gloo, which is switched on here. With
none of these variables set nothing happens: one process, ``jax.process_count() == 1``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

DISTRIBUTED = "TESSERA_DISTRIBUTED"
COORDINATOR = "TESSERA_COORDINATOR"
NUM_PROCESSES = "TESSERA_NUM_PROCESSES"
PROCESS_ID = "TESSERA_PROCESS_ID"
_EXPLICIT = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)


def requested() -> bool:
    """Whether the environment asks this process to join a multi-process run."""
    return os.environ.get(DISTRIBUTED, "") not in ("", "0") or any(
        os.environ.get(k) for k in _EXPLICIT
    )


def explicit_args() -> dict[str, object]:
    """``coordinator_address``, ``num_processes``, ``process_id`` from ``TESSERA_*``; {} when
    none is set; ValueError naming what is missing or malformed."""
    given = {k: os.environ.get(k, "") for k in _EXPLICIT}
    if not any(given.values()):
        return {}
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ValueError(f"{', '.join(missing)} must be set together with {', '.join(given)}")
    try:
        num, pid = int(given[NUM_PROCESSES]), int(given[PROCESS_ID])
    except ValueError:
        raise ValueError(
            f"{NUM_PROCESSES}={given[NUM_PROCESSES]!r} and {PROCESS_ID}={given[PROCESS_ID]!r} "
            "must be integers"
        ) from None
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"{PROCESS_ID}={pid} must be in [0, {NUM_PROCESSES}={num})")
    return {"coordinator_address": given[COORDINATOR], "num_processes": num, "process_id": pid}


def initialize() -> bool:
    """Join the run the environment describes (see the module docstring), before any other jax
    use; returns whether it joined. Gloo carries CPU collectives between the processes."""
    if not requested():
        return False
    import jax

    args = explicit_args()
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    return True


def barrier(name: str) -> None:
    """Wait until every process of the run reaches ``barrier(name)``; nothing with one process."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental.multihost_utils import sync_global_devices

        sync_global_devices(name)


def to_host(x: Any) -> np.ndarray:
    """``x`` (a jax array) as a host array on this process; one that spans other processes'
    devices is all-gathered (a collective every process must join)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
    """True when `flag` is true on any process (an all-gather of one bool; no collective with
    one process)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag]))).any())
