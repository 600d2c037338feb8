"""``cpu_decode``: a decode step's attention (T = 1 over a cache) by tessera's CPU kernel
(`tessera.kernels.cpu`, ``kernels.cc``), the (batch row, kv head) items split between the
calling thread and a helper thread. The mask is `reference`'s (positions, segments, sliding
window, ``kv_valid``), computed by XLA and passed as [B, S]; scores, float32 softmax and output
are the kernel's. Float32 on CPU, one device, no logit soft cap. Gradients (a one-query
attention in training: ViT's MAP head) are XLA's, of the reference's same math
(`reference.masked_decode_attention`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from tessera.kernels import cpu
from tessera.kernels.attention import reference


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    kv_valid: jax.Array | None = None,
    logit_soft_cap: float | None = None,
    **unused: Any,
) -> jax.Array:
    """`reference.decode_attention` by the kernel: q [B, 1, Hq, D] -> [B, 1, Hq, Dv]."""
    del unused  # block sizes, index_aligned: no meaning here
    mask = reference._checked_mask(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal,
        sliding_window, kv_valid, logit_soft_cap,
    )[:, 0, :]  # [B, S]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _attend(q[:, 0], k, v, mask.astype(jnp.float32), float(scale))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    return cpu.decode_attention(q, k, v, mask, scale)


def _attend_fwd(q, k, v, mask, scale):
    return cpu.decode_attention(q, k, v, mask, scale), (q, k, v, mask)


def _attend_bwd(scale, res, g):
    q, k, v, mask = res

    def forward(q, k, v):
        out = reference.masked_decode_attention(q[:, None], k, v, mask > 0, scale=scale)
        return out[:, 0]

    _, vjp = jax.vjp(forward, q, k, v)
    return (*vjp(g), jnp.zeros_like(mask))


_attend.defvjp(_attend_fwd, _attend_bwd)


def supports(q: jax.Array, k: jax.Array, v: jax.Array, *args: Any, **kw: Any) -> str | None:
    if q.shape[1] != 1:
        return f"one query token per row only (decode), got T = {q.shape[1]}"
    if kw.get("index_aligned"):
        return "index_aligned self attention (no cache)"
    if kw.get("logit_soft_cap"):
        return "no logit soft cap in the kernel"
    return cpu.unavailable(q, k, v)


def auto(*args: Any, **kw: Any) -> str | None:
    """Auto takes the kernel in decode programs only (`tessera.kernels.cpu.decoding`)."""
    return cpu.decode_reason()
