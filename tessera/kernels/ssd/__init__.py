"""Mamba-2 state-space duality (SSD) behind one dispatch: ``ssd(x, dt, A, B, C, D, impl=...)``.

impls (the recurrence and shapes are in `reference`):
  chunked      the SSD algorithm: quadratic form inside chunks, recurrence between them. Training
               and prefill path. ``xla`` names the same path.
  associative  lax.associative_scan over time.
  sequential   lax.scan over time: the oracle and the decode step.
  pallas_tpu, pallas_gpu  not written yet; naming one raises NotImplementedError.
  auto         chunked; sequential for a single token (T = 1, a decode step), where both are
               exact and the step skips the chunk bookkeeping.
"""

from __future__ import annotations

import jax

from tessera.kernels.dispatch import check_impl
from tessera.kernels.ssd import reference

IMPLS = ("auto", "xla", "chunked", "associative", "sequential", "pallas_tpu", "pallas_gpu")

__all__ = ["IMPLS", "ssd"]


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
    check_impl("ssd", impl, IMPLS)
    if impl == "auto":
        impl = "sequential" if x.shape[1] == 1 else "chunked"
    if impl in ("chunked", "xla"):
        return reference.chunked(x, dt, A, B, C, D, h0=h0, reset=reset, chunk_size=chunk_size)
    form = reference.sequential if impl == "sequential" else reference.associative
    return form(x, dt, A, B, C, D, h0=h0, reset=reset)
