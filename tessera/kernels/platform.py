"""Where a kernel's program will run, and Pallas interpret mode for CPU tests.

``target_platform()`` is the platform of the program being built (``target_device()`` one of
its devices): the active mesh's devices when
one is active (an AOT compile for a TPU topology on a CPU host has TPU devices there), else the
default backend. Impl ``supports`` checks read it instead of ``jax.default_backend()``, so that
``tessera.aot`` picks the TPU kernels on a CPU-only machine.

``interpret()`` says whether Pallas kernels run in interpret mode; the tests turn it on with
``with interpreting():`` (TPU kernels; the ``pallas_interpret`` fixture) or
``with interpreting("gpu"):`` to check TPU or GPU kernels on CPU. Interpret mode stands in for
one platform at a time, so that auto picks what it would pick there. Read at trace time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from tessera.sharding.context import active

_state = threading.local()


def target_device() -> jax.Device:
    """A device of the program being traced: the active mesh's first, else the default one
    (its ``device_kind`` keys the kernels' per-generation block tables)."""
    ctx = active()
    return ctx[0].devices.flat[0] if ctx is not None else jax.devices()[0]


def target_platform() -> str:
    """"tpu", "gpu" (cuda / rocm report "gpu") or "cpu": where the program being traced runs."""
    platform = target_device().platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def _stack() -> list[str]:
    if not hasattr(_state, "platforms"):
        _state.platforms = []
    return _state.platforms


def interpret() -> bool:
    """Whether Pallas kernels run in interpret mode (set by `interpreting`)."""
    return bool(_stack())


@contextlib.contextmanager
def interpreting(platform: str = "tpu") -> Iterator[None]:
    """Run the ``platform`` ("tpu" / "gpu") Pallas kernels traced inside in interpret mode, on
    any backend (CPU tests)."""
    if platform not in ("tpu", "gpu"):
        raise ValueError(f"interpreting: platform must be 'tpu' or 'gpu', got {platform!r}")
    _stack().append(platform)
    try:
        yield
    finally:
        _stack().pop()


LANES = 128  # a TPU vreg's lanes: the minor dim of a Mosaic block tile


def heads_filling_lanes(heads: int, dims: tuple[int, ...]) -> int:
    """The fewest heads, dividing ``heads``, whose features fill whole 128-lane tiles in every
    array (``n * d`` a multiple of `LANES` for each d in ``dims``), else all ``heads``: the heads
    a TPU kernel takes per block of a token-major [.., H * d] array."""
    for n in range(1, heads + 1):
        if heads % n == 0 and all((n * d) % LANES == 0 for d in dims):
            return n
    return heads


# jax_default_matmul_precision values that ask for full float32 (more than one bf16 pass on TPU,
# more than TF32 on GPU) from a float32 dot.
FULL_F32_PRECISIONS = ("highest", "float32", "F32_F32_F32", "F64_F64_F64", "BF16_BF16_F32_X6",
                       "BF16_BF16_F32_X9", "TF32_TF32_F32_X3")


def full_f32_matmuls() -> bool:
    """Whether ``jax_default_matmul_precision`` asks float32 dots for full float32 (read at trace
    time). Unset, XLA's float32 dot on TPU is one bfloat16 pass, on GPU TF32; a kernel whose
    float32 matmuls follow this setting computes what the XLA path beside it computes."""
    return jax.config.jax_default_matmul_precision in FULL_F32_PRECISIONS


def tf32_reason(x: jax.Array) -> str | None:
    """Why auto passes a Triton kernel over for ``x``: float32 when full-precision dots were
    asked for (`full_f32_matmuls`), since the kernel's dots run at TF32; else None."""
    if x.dtype == jnp.float32 and full_f32_matmuls():
        precision = jax.config.jax_default_matmul_precision
        return (f"float32 with jax_default_matmul_precision={precision!r}: the Triton kernel's "
                "dots run at TF32")
    return None


def kernel_platform_reason(want: str) -> str | None:
    """None when a ``want`` ("tpu" / "gpu") kernel can run here (the target platform, or interpret
    mode), else the reason, for an impl's ``supports`` check."""
    platform = target_platform()
    if platform == want or (_stack() and _stack()[-1] == want):
        return None
    return f"a {want.upper()} kernel (the program runs on {platform})"
