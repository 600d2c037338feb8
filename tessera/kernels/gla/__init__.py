"""Chunked gated linear recurrence (GLA) behind one dispatch: ``gla(q, k, v, g, ...)``.

One op for RetNet (scalar decay per head), GLA and RWKV-6 (per-channel decay; RWKV-6 with its
bonus ``u``). The recurrence and shapes are in `reference`.

impls, in the order auto tries them (`OP`, a `tessera.kernels.registry.Op`):
  pallas_tpu   Pallas TPU (Mosaic) kernels, forward and backward (`pallas_tpu`): chunks on a
               sequential grid axis, the state in VMEM; its chunk length is the kernel's own
               (`pallas_tpu.CHUNKS`), not ``chunk_size``. Auto's pick on TPU (and in interpret
               mode) for T > 1.
  pallas_tpu_decode  `tessera.kernels.state_step`: one token on TPU (or in interpret mode), the
               state read and written once, in place; no gradient. Auto picks it for per-channel
               decays only: XLA's step for a scalar decay already moves the state just once.
  pallas_gpu   Pallas Triton kernels, forward and backward (`pallas_gpu`): one program per
               batch row and head looping over chunks. On a GPU (or in GPU interpret mode) for
               T > 1; auto skips it for float32 under full-precision matmuls (TF32 dots).
  sequential   lax.scan over time: the oracle and the decode step. Auto picks it for a single
               token (T = 1).
  chunked      state passed between chunks, exact quadratic form inside them. Training and
               prefill path; auto's pick for T > 1 off TPU and GPU. ``xla`` is an alias.
  parallel     the quadratic form over the whole sequence (O(T^2)). Only when named.
  auto         T = 1: pallas_tpu_decode on TPU for per-channel decays, else sequential;
               T > 1: pallas_tpu on TPU, pallas_gpu on a GPU, else chunked. Kernels join
               with `OP.register(impl, before=...)`; every impl takes the arguments of `gla`.
"""

from __future__ import annotations

import jax

from tessera.kernels import state_step
from tessera.kernels.gla import pallas_gpu, pallas_tpu, reference
from tessera.kernels.registry import (
    Impl,
    Op,
    drop_kwargs,
    impls_getattr,
    many_tokens,
    single_token,
)

__all__ = ["IMPLS", "OP", "gla"]


def _state_step(q, k, v, g, *, u=None, h0=None, reset=None, scale=1.0, chunk_size=None):
    reference.check_inputs(q, k, v, g, u, h0, reset)
    return state_step.step(q, k, v, g, u=u, h0=h0, reset=reset, scale=scale)


def _per_channel(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, **kw) -> str | None:
    return None if g.ndim == 4 else "scalar decay: XLA's step already moves the state once"


OP = Op(
    "gla",
    [
        Impl("pallas_tpu", pallas_tpu.gla, supports=pallas_tpu.supports, auto=many_tokens),
        Impl("pallas_tpu_decode", _state_step, supports=state_step.supports, auto=_per_channel),
        Impl("pallas_gpu", pallas_gpu.gla, pallas_gpu.supports, auto=pallas_gpu.auto_skips),
        Impl("sequential", drop_kwargs(reference.sequential, "chunk_size"), auto=single_token),
        Impl("chunked", reference.chunked),
        Impl("parallel", drop_kwargs(reference.parallel, "chunk_size"), auto=False),
    ],
    aliases={"xla": "chunked"},
)

__getattr__ = impls_getattr(OP)  # IMPLS = ("auto", *OP.names)


def gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    u: jax.Array | None = None,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    scale: float = 1.0,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """q, k [B, T, H, K], v [B, T, H, V], g (log decay <= 0) [B, T, H, K] per channel or
    [B, T, H] per head, u [H, K] or None (RWKV-6 bonus: the output reads the state before the
    token plus diag(u) k_t^T v_t), h0 [B, H, K, V] or None, reset bool [B, T] or None (state
    zeroed before the token) -> (o [B, T, H, V] in v.dtype, final state [B, H, K, V] float32).

    Without u: S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.
    ``chunk_size`` only applies to the chunked form (None: 16 per-channel, 64 scalar).
    """
    return OP(
        q, k, v, g, u=u, h0=h0, reset=reset, scale=scale, chunk_size=chunk_size, impl=impl
    )
