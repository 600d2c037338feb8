"""Mamba-2 state-space duality (SSD) behind one dispatch: ``ssd(x, dt, A, B, C, D, impl=...)``.

impls, in the order auto tries them (`OP`, a `tessera.kernels.registry.Op`; the recurrence and
shapes are in `reference`):
  pallas_tpu   the Pallas TPU GLA kernels (`tessera.kernels.gla.pallas_tpu`, scalar decay) as
               `via_gla` maps SSD to gla (`pallas_tpu`): one group's B / C read as they are,
               G > 1 repeated to heads; its chunk length is the kernel's own, not
               ``chunk_size``. Auto's pick on TPU (and in interpret mode) for T > 1.
  pallas_gpu   the Pallas Triton GLA kernels through `via_gla` (`pallas_gpu`). On a GPU (or in
               GPU interpret mode) for T > 1; auto skips it for float32 under full-precision
               matmuls (TF32 dots).
  sequential   lax.scan over time: the oracle and the decode step. Auto picks it for a single
               token (T = 1), where both forms are exact and the step skips the chunk bookkeeping.
  chunked      the SSD algorithm: quadratic form inside chunks, recurrence between them. Training
               and prefill path; auto's pick for T > 1 off TPU and GPU. ``xla`` is an alias.
  associative  lax.associative_scan over time. Only when named.
  auto         sequential for T = 1; for T > 1 pallas_tpu on TPU, pallas_gpu on a GPU, else
               chunked. Kernels join with `OP.register(impl, before=...)`.
"""

from __future__ import annotations

import jax

from tessera.kernels.registry import (
    Impl,
    Op,
    drop_kwargs,
    impls_getattr,
    many_tokens,
    single_token,
)
from tessera.kernels.ssd import pallas_gpu, pallas_tpu, reference

__all__ = ["IMPLS", "OP", "ssd"]


OP = Op(
    "ssd",
    [
        Impl("pallas_tpu", pallas_tpu.ssd, supports=pallas_tpu.supports, auto=many_tokens),
        Impl("pallas_gpu", pallas_gpu.ssd, pallas_gpu.supports, auto=pallas_gpu.auto_skips),
        Impl("sequential", drop_kwargs(reference.sequential, "chunk_size"), auto=single_token),
        Impl("chunked", reference.chunked),
        Impl("associative", drop_kwargs(reference.associative, "chunk_size"), auto=False),
    ],
    aliases={"xla": "chunked"},
)

__getattr__ = impls_getattr(OP)  # IMPLS = ("auto", *OP.names)


def ssd(
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
    """x [B, T, H, P], dt [B, T, H], A [H], B/C [B, T, G, N], D [H], h0 [B, H, P, N] or None,
    reset bool [B, T] or None -> (y [B, T, H, P] in x.dtype, final state [B, H, P, N] float32).

    ``chunk_size`` only applies to the chunked form.
    """
    return OP(x, dt, A, B, C, D, h0=h0, reset=reset, chunk_size=chunk_size, impl=impl)
