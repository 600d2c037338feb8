"""RWKV-7's generalised delta rule behind one dispatch: ``delta_rule(r, w, k, v, a, b, impl=...)``.

impls, in the order auto tries them (`OP`, a `tessera.kernels.registry.Op`; the recurrence, state
layout and the chunked derivation are in `reference`):
  pallas_tpu  `pallas_tpu.delta_rule`: Pallas TPU (Mosaic) forward and backward kernels, the
              chunked WY form per chunk of ``chunk_size`` (16 or 32) tokens with the state in
              VMEM, grid (batch, head group, chunk); on TPU (or in interpret mode). Auto picks
              it for T > 1.
  pallas_tpu_decode  `tessera.kernels.state_step`: one token on TPU (or in interpret mode), the
              state read and written once, in place; no gradient. Auto's pick for T = 1 there.
  pallas_gpu  Pallas Triton kernels, forward and backward (`pallas_gpu`): the fused recurrent
              form, one program per batch row and head. On a GPU (or in GPU interpret mode) for
              T > 1.
  sequential  lax.scan over time: the oracle and the decode step. Auto picks it for a single token
              (T = 1).
  chunked     the chunk-parallel WY / UT-transform form (XLA): training and prefill path; auto's
              pick for T > 1 off TPU and GPU. ``xla`` is an alias.
Pallas kernels join with `OP.register(impl, before=...)`.
"""

from __future__ import annotations

import jax

from tessera.kernels import state_step
from tessera.kernels.delta_rule import pallas_gpu, pallas_tpu, reference
from tessera.kernels.registry import (
    Impl,
    Op,
    drop_kwargs,
    impls_getattr,
    many_tokens,
    single_token,
)

__all__ = ["IMPLS", "OP", "delta_rule"]


def _state_step(r, w, k, v, a, b, *, h0=None, reset=None, scale=1.0, chunk_size=None):
    reference.check_inputs(r, w, k, v, a, b, h0, reset)
    return state_step.step(r, k, v, w, a=a, b=b, h0=h0, reset=reset, scale=scale)


OP = Op(
    "delta_rule",
    [
        Impl(
            "pallas_tpu",
            pallas_tpu.delta_rule,
            supports=pallas_tpu.supports,
            auto=many_tokens,
        ),
        Impl("pallas_tpu_decode", _state_step, supports=state_step.supports),
        Impl("pallas_gpu", pallas_gpu.delta_rule, pallas_gpu.supports, auto=pallas_gpu.auto_skips),
        Impl("sequential", drop_kwargs(reference.sequential, "chunk_size"), auto=single_token),
        Impl("chunked", reference.chunked),
    ],
    aliases={"xla": "chunked"},
)

__getattr__ = impls_getattr(OP)  # IMPLS = ("auto", *OP.names)


def delta_rule(
    r: jax.Array,
    w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    scale: float = 1.0,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """S_t = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T r_t.

    r, w (log decay, <= 0), k, a, b [B, T, H, K]; v [B, T, H, V]; h0 [B, H, K, V] or None
    (zeros); reset bool [B, T] or None (zero the state before a token) -> (o [B, T, H, V] in
    v.dtype, final state [B, H, K, V] float32). ``chunk_size`` (default 16) applies to the
    chunked form and to pallas_tpu (which takes 16 or 32). For RWKV-7, a = -kk and b = kk * iclr.
    """
    return OP(r, w, k, v, a, b, h0=h0, reset=reset, scale=scale, chunk_size=chunk_size, impl=impl)
