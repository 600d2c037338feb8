"""Plain-jnp attention: the XLA path for short sequences and the oracle every other impl must match.

One function serves training (packed sequences), prefill and cached decode: masking is driven by
absolute positions and segment ids, never by array indices, so keys may come from a cache in any
slot order. Query heads are grouped onto kv heads (MHA / GQA / MQA) without repeating K and V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite stand-in for -inf: masked scores never produce inf - inf = NaN, and a fully masked row
# stays finite (its probabilities are zeroed explicitly).
MASK_VALUE = -1e30
# decode_attention computes the scores as one matmul against block-diagonal queries up to this
# many kv heads (Hkv times the multiply-adds), as products reduced over D above it.
BLOCK_DIAGONAL_MAX_KV_HEADS = 4


def make_attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    kv_valid: jax.Array | None = None,
) -> jax.Array:
    """Which keys each query may attend: bool [B, T, S].

    q_positions [B, T], kv_positions [B, S] (int); segment ids int [B, T] / [B, S], 0 = padding,
    a query sees only keys of its own (non-zero) segment; causal keeps `q_pos >= kv_pos`;
    `sliding_window=W` also keeps only `q_pos - kv_pos < W`; kv_valid bool [B, S] marks filled
    cache slots.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    qp = q_positions[:, :, None]
    kp = kv_positions[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if causal:
        mask &= qp >= kp
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    if q_segment_ids is not None:
        ks = kv_segment_ids[:, None, :]
        mask &= (q_segment_ids[:, :, None] == ks) & (ks != 0)
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return mask


def check_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    sliding_window: int | None,
    kv_valid: jax.Array | None,
    logit_soft_cap: float | None = None,
) -> None:
    """Raise ValueError naming the first argument whose shape does not fit the others."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape != (b, s, hkv, d):
        raise ValueError(f"k shape {k.shape} does not fit q shape {q.shape}: want [B, S, Hkv, D]")
    if v.shape[:3] != (b, s, hkv):
        raise ValueError(f"v shape {v.shape} does not fit k shape {k.shape}: want [B, S, Hkv, Dv]")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    for name, arr, want in (
        ("q_positions", q_positions, (b, t)),
        ("kv_positions", kv_positions, (b, s)),
        ("q_segment_ids", q_segment_ids, (b, t)),
        ("kv_segment_ids", kv_segment_ids, (b, s)),
        ("kv_valid", kv_valid, (b, s)),
    ):
        if arr is not None and arr.shape != want:
            raise ValueError(f"{name} shape {arr.shape} should be {want}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if logit_soft_cap is not None and not logit_soft_cap > 0:
        raise ValueError(f"logit_soft_cap must be > 0 (or None), got {logit_soft_cap}")


def _checked_mask(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
    q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None, causal: bool,
    sliding_window: int | None, kv_valid: jax.Array | None, logit_soft_cap: float | None,
) -> jax.Array:
    """`check_inputs`, then the bool [B, T, S] mask of `make_attention_mask`."""
    check_inputs(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window, kv_valid,
        logit_soft_cap,
    )
    return make_attention_mask(
        q_positions, kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        causal=causal, sliding_window=sliding_window, kv_valid=kv_valid,
    )


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
) -> jax.Array:
    """Masked softmax attention: q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] -> out
    [B, T, Hq, Dv].

    Hq must be a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)). Scores and softmax
    are float32; the output has q's dtype. Queries with no visible key get 0 (finite gradients).
    ``logit_soft_cap=c`` squashes the scaled scores to ``c * tanh(s / c)`` (Gemma 2, Grok).
    Materialises the [B, Hq, T, S] scores: use the chunked path for long sequences.
    """
    mask = _checked_mask(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal,
        sliding_window, kv_valid, logit_soft_cap,
    )[:, None, None]  # [B, 1, 1, T, S]
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if logit_soft_cap is not None:
        scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
    scores = jnp.where(mask, scores, MASK_VALUE)
    m = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, v.shape[-1]).astype(q.dtype)


def decode_attention(
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
) -> jax.Array:
    """`attention` for one query token per row (T = 1, a decode step over a cache), computed in
    the cache's own [B, S, Hkv, D] layout.

    The scores are ``sum_d k[b, s, h, d] * q[b, h, g, d]`` and the output ``sum_s p[b, s, h, g] *
    v[b, s, h, :]``: the output as elementwise products reduced over S, which XLA fuses into one
    pass over V; the scores the same way over D, or (up to BLOCK_DIAGONAL_MAX_KV_HEADS kv heads,
    measured faster on CPU) as one matmul of K flattened to [B, S, Hkv * D] with the queries
    spread into a block-diagonal [B, Hkv * D, Hkv * G]. The einsums of `attention` are dots with
    (batch, kv head) batch dimensions, and XLA (CPU) lays K and V out head-major for them: a
    transposed copy of the whole cache in every layer at every step, which doubled the bytes of
    a bandwidth-bound step. Same masking contract and float32 softmax as `attention`.
    """
    if q.shape[1] != 1:
        raise ValueError(f"decode_attention takes one query token per row, got T = {q.shape[1]}")
    mask = _checked_mask(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal,
        sliding_window, kv_valid, logit_soft_cap,
    )[:, 0, :]
    return masked_decode_attention(q, k, v, mask, scale=scale, logit_soft_cap=logit_soft_cap)


def masked_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float | None = None,
    logit_soft_cap: float | None = None,
) -> jax.Array:
    """`decode_attention`'s math once its bool mask [B, S] (the slots each row sees) is made:
    q [B, 1, Hq, D] -> [B, 1, Hq, Dv]. The CPU kernel's backward differentiates this."""
    b, _, hq, d = q.shape
    mask = mask[:, :, None, None]  # [B, S, 1, 1]
    hkv, dv = k.shape[2], v.shape[-1]
    scale = d**-0.5 if scale is None else scale
    g = hq // hkv
    qg = q[:, 0].reshape(b, hkv, g, d).astype(jnp.float32)
    kf = k.astype(jnp.float32)
    if hkv <= BLOCK_DIAGONAL_MAX_KV_HEADS:
        # One matmul of the keys [B, S, Hkv * D] (their own layout, flattened) with the queries
        # as a block-diagonal [B, Hkv * D, Hkv * G]: Hkv times the multiply-adds, a cheap trade
        # for a dot XLA runs without moving the cache.
        eye = jnp.eye(hkv, dtype=jnp.float32)
        blocks = qg[:, :, :, None, :] * eye[None, :, None, :, None]  # [B, Hkv, G, Hkv', D]
        blocks = blocks.transpose(0, 3, 4, 1, 2).reshape(b, hkv * d, hkv * g)
        scores = jnp.einsum("bsn,bnm->bsm", kf.reshape(b, -1, hkv * d), blocks,
                            precision=jax.lax.Precision.HIGHEST).reshape(b, -1, hkv, g)
    else:
        scores = jnp.sum(kf[:, :, :, None, :] * qg[:, None], axis=-1)  # [B, S, Hkv, G]
    scores = scores * scale
    if logit_soft_cap is not None:
        scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
    scores = jnp.where(mask, scores, MASK_VALUE)
    m = jax.lax.stop_gradient(scores.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    denom = p.sum(axis=1)  # [B, Hkv, G]
    out = jnp.sum(p[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)  # [B,Hkv,G,Dv]
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(b, 1, hq, dv).astype(q.dtype)
