"""Where a kernel's program will run, and Pallas interpret mode for CPU tests.

``target_platform()`` is the platform of the program being built: the active mesh's devices when
one is active (an AOT compile for a TPU topology on a CPU host has TPU devices there), else the
default backend. Impl ``supports`` checks read it instead of ``jax.default_backend()``, so that
``tessera.aot`` picks the TPU kernels on a CPU-only machine.

``interpret()`` says whether Pallas kernels run in interpret mode; the tests turn it on with
``with interpreting():`` (or the ``pallas_interpret`` fixture) to check TPU and GPU kernels on
CPU. Read at trace time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax

from tessera.sharding.context import active

_state = threading.local()


def target_platform() -> str:
    """"tpu", "gpu" (cuda / rocm report "gpu") or "cpu": where the program being traced runs."""
    ctx = active()
    platform = ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def interpret() -> bool:
    """Whether Pallas kernels run in interpret mode (set by `interpreting`)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def interpreting() -> Iterator[None]:
    """Run Pallas kernels traced inside in interpret mode, on any backend (CPU tests)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def kernel_platform_reason(want: str) -> str | None:
    """None when a ``want`` ("tpu" / "gpu") kernel can run here (the target platform, or interpret
    mode), else the reason, for an impl's ``supports`` check."""
    platform = target_platform()
    if platform == want or interpret():
        return None
    return f"a {want.upper()} kernel (the program runs on {platform})"
