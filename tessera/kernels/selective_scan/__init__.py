"""Mamba-1 selective scan behind one dispatch: `selective_scan(x, dt, A, B, C, D, impl="auto")`.

impls, in the order auto tries them (`OP`, a `tessera.kernels.registry.Op`; all but the Pallas
kernels in `reference`, plain jnp):
  pallas_tpu   Pallas Mosaic kernel (`pallas_tpu`): the state [N, Di block] in VMEM, a token loop
               per chunk, a custom-VJP backward that saves one state per chunk and recomputes
               each chunk's states; under shard_map (batch, act_ssm_inner). On TPU (or in
               interpret mode) for T > 1; ignores ``chunk_size`` (its own per-generation table).
  pallas_gpu   Pallas Triton kernels, forward and backward (`pallas_gpu`): one program per batch
               row and channel block stepping through time. On a GPU (or in GPU interpret mode)
               for T > 1.
  chunked      associative scan within chunks, lax.scan across them, rematerialised chunk body;
               memory O(chunk) per step. The training and prefill path off TPU (auto: T > 1).
  associative  one jax.lax.associative_scan over T; memory [B, T, Di, N]. Only when named.
  sequential   lax.scan over time; the oracle and the decode step (auto: T = 1).
  auto         pallas_tpu on TPU, pallas_gpu on a GPU, else chunked, for T > 1; sequential for
               T = 1 (decode). Pallas kernels join with `OP.register(impl, before=...)`.
"""

from __future__ import annotations

import jax

from tessera.kernels.registry import Impl, Op, drop_kwargs, impls_getattr
from tessera.kernels.selective_scan import pallas_gpu, pallas_tpu, reference

__all__ = ["IMPLS", "OP", "selective_scan"]


def _check_shapes(x, dt, A, B, C, D, h0, reset) -> None:
    if x.ndim != 3:
        raise ValueError(f"selective_scan: x must be [B, T, Di], got shape {x.shape}")
    b, t, di = x.shape
    if t == 0:
        raise ValueError("selective_scan: x has no time steps (T = 0)")
    if A.ndim != 2 or A.shape[0] != di:
        raise ValueError(f"selective_scan: A must be [Di={di}, N], got shape {A.shape}")
    n = A.shape[1]
    want = {
        "dt": (dt, (b, t, di)),
        "B": (B, (b, t, n)),
        "C": (C, (b, t, n)),
        "D": (D, (di,)),
        "h0": (h0, (b, di, n)),
        "reset": (reset, (b, t)),
    }
    for name, (a, shape) in want.items():
        if a is not None and tuple(a.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {a.shape}")


def _multi_token(x: jax.Array, *args, **kwargs) -> str | None:
    """Auto's check for the chunked forms: T = 1 (a decode step) goes to the sequential form."""
    return "T = 1: a decode step (the sequential form)" if x.shape[1] == 1 else None


def _one_token(x: jax.Array, *args, **kwargs) -> str | None:
    """Auto runs the sequential form for decode steps (T = 1) only."""
    return None if x.shape[1] == 1 else f"T = {x.shape[1]} > 1 (only for decode steps)"


OP = Op(
    "selective_scan",
    [
        Impl(
            "pallas_tpu",
            drop_kwargs(pallas_tpu.selective_scan, "chunk_size"),
            supports=pallas_tpu.supports,
            auto=_multi_token,
        ),
        Impl("pallas_gpu", pallas_gpu.selective_scan, pallas_gpu.supports,
             auto=pallas_gpu.auto_skips),
        Impl("chunked", reference.chunked, auto=_multi_token),
        Impl("associative", drop_kwargs(reference.associative, "chunk_size"), auto=False),
        Impl("sequential", drop_kwargs(reference.sequential, "chunk_size"), auto=_one_token),
    ],
)

__getattr__ = impls_getattr(OP)  # IMPLS = ("auto", *OP.names)


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    *,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t + D x_t`` in float32.

    x, dt [B, T, Di]; A [Di, N]; B, C [B, T, N]; D [Di]; h0 [B, Di, N] (default zeros); reset
    bool [B, T] zeroes the state before a token. Returns y [B, T, Di] (x's dtype) and the final
    state [B, Di, N] float32. ``chunk_size`` only applies to the chunked form.
    """
    _check_shapes(x, dt, A, B, C, D, h0, reset)
    return OP(x, dt, A, B, C, D, h0=h0, reset=reset, chunk_size=chunk_size, impl=impl)
