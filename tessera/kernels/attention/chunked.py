"""Memory-efficient XLA attention: online softmax over key blocks, one query block at a time.

The [T, S] score matrix is never built: the forward keeps a running max, normaliser and output per
query block while it scans key blocks, and saves only the output and the row logsumexp. The
backward (a `jax.custom_vjp`) rescans the blocks, recomputing each score tile from the saved
logsumexp, so training memory is O(T + S) per head as well. Tiles where the mask hides every
entry (the upper triangle under causal masking, outside a sliding window, across segments) are
skipped. Lengths that are not multiples of the block sizes are padded internally.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from tessera.kernels.attention.reference import MASK_VALUE, check_inputs, make_attention_mask

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512


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
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
) -> jax.Array:
    """Blockwise attention, same contract as `reference.attention`.

    q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] -> [B, T, Hq, Dv] in q's dtype.
    block_q / block_kv are clipped to T / S, so a decode step (T=1) runs a single query row.
    """
    check_inputs(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window, kv_valid
    )
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_kv={block_kv}")
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    bq, bk = min(block_q, t), min(block_kv, s)
    nq, nk = math.ceil(t / bq), math.ceil(s / bk)

    # Everything is one segment unless told otherwise; empty cache slots and the padding added
    # below become segment 0, which no query attends.
    if q_segment_ids is None:
        q_segment_ids = jnp.ones((b, t), jnp.int32)
        kv_segment_ids = jnp.ones((b, s), jnp.int32)
    if kv_valid is not None:
        kv_segment_ids = jnp.where(kv_valid, kv_segment_ids, 0)

    out = _flash(
        causal,
        sliding_window,
        float(scale),
        _to_blocks(q.reshape(b, t, hkv, hq // hkv, d), nq, bq),
        _to_blocks(k, nk, bk),
        _to_blocks(v, nk, bk),
        _to_blocks(q_positions.astype(jnp.int32), nq, bq),
        _to_blocks(kv_positions.astype(jnp.int32), nk, bk),
        _to_blocks(q_segment_ids.astype(jnp.int32), nq, bq),
        _to_blocks(kv_segment_ids.astype(jnp.int32), nk, bk),
    )  # [nq, B, bq, Hkv, G, Dv]
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, hq, v.shape[-1])
    return out[:, :t]


def _to_blocks(x: jax.Array, n: int, size: int) -> jax.Array:
    """[B, L, ...] -> [n, B, size, ...], zero-padding L up to n * size."""
    pad = [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def _tile_mask(qpos, kpos, qseg, kseg, causal, window):
    """bool [B, 1, 1, bq, bk] for one (query block, key block) tile."""
    mask = make_attention_mask(
        qpos, kpos, q_segment_ids=qseg, kv_segment_ids=kseg, causal=causal, sliding_window=window
    )
    return mask[:, None, None]


def _scores(qi, kj, mask, scale):
    """float32 [B, Hkv, G, bq, bk] scores of a tile, masked entries set to MASK_VALUE."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, MASK_VALUE)


def _forward(causal, window, scale, q, k, v, qpos, kpos, qseg, kseg):
    """Returns out [nq, B, bq, Hkv, G, Dv] (q's dtype) and logsumexp [nq, B, Hkv, G, bq] (f32)."""
    _, b, bq, hkv, g, _ = q.shape
    dv = v.shape[-1]

    def q_block(args):
        qi, qpi, qsi = args

        def kv_step(carry, xs):
            kj, vj, kpj, ksj = xs
            mask = _tile_mask(qpi, kpj, qsi, ksj, causal, window)

            def update(carry):
                m, denom, acc = carry
                s = _scores(qi, kj, mask, scale)
                m_new = jnp.maximum(m, s.max(axis=-1))
                alpha = jnp.exp(m - m_new)
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                pv = jnp.einsum(
                    "bkgqs,bskd->bkgqd", p.astype(vj.dtype), vj,
                    preferred_element_type=jnp.float32,
                )
                return m_new, alpha * denom + p.sum(axis=-1), alpha[..., None] * acc + pv

            return jax.lax.cond(mask.any(), update, lambda c: c, carry), None

        init = (
            jnp.full((b, hkv, g, bq), MASK_VALUE, jnp.float32),
            jnp.zeros((b, hkv, g, bq), jnp.float32),
            jnp.zeros((b, hkv, g, bq, dv), jnp.float32),
        )
        (m, denom, acc), _ = jax.lax.scan(kv_step, init, (k, v, kpos, kseg))
        seen = denom > 0
        denom = jnp.where(seen, denom, 1.0)
        out = (acc / denom[..., None]).astype(q.dtype)
        # Rows that see no key keep logsumexp 0: with every score masked, the backward's
        # exp(MASK_VALUE - 0) is exactly 0, so they get zero gradient.
        lse = jnp.where(seen, m + jnp.log(denom), 0.0)
        return jnp.einsum("bkgqd->bqkgd", out), lse

    return jax.lax.map(q_block, (q, qpos, qseg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(causal, window, scale, q, k, v, qpos, kpos, qseg, kseg):
    """Blocked attention on pre-blocked inputs (see `_to_blocks`); returns blocked output."""
    return _forward(causal, window, scale, q, k, v, qpos, kpos, qseg, kseg)[0]


def _flash_fwd(causal, window, scale, q, k, v, qpos, kpos, qseg, kseg):
    out, lse = _forward(causal, window, scale, q, k, v, qpos, kpos, qseg, kseg)
    return out, (q, k, v, qpos, kpos, qseg, kseg, out, lse)


def _flash_bwd(causal, window, scale, res, dout):
    """One pass over key blocks (outer) and query blocks (inner): dk, dv accumulate in the inner
    carry, dq contributions come out per query block and are summed across key blocks."""
    q, k, v, qpos, kpos, qseg, kseg, out, lse = res
    _, b, bq, hkv, g, d = q.shape
    delta = jnp.einsum(
        "nbqkgd,nbqkgd->nbkgq", dout.astype(jnp.float32), out.astype(jnp.float32)
    )  # [nq, B, Hkv, G, bq]

    def kv_block(dq_acc, xs):
        kj, vj, kpj, ksj = xs

        def q_step(carry, ys):
            qi, doi, lsei, deltai, qpi, qsi = ys
            mask = _tile_mask(qpi, kpj, qsi, ksj, causal, window)

            def grads(carry):
                dk, dv = carry
                p = jnp.exp(_scores(qi, kj, mask, scale) - lsei[..., None])
                dv = dv + jnp.einsum(
                    "bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi,
                    preferred_element_type=jnp.float32,
                )
                dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - deltai[..., None]) * scale
                dq = jnp.einsum(
                    "bkgqs,bskd->bqkgd", ds.astype(kj.dtype), kj,
                    preferred_element_type=jnp.float32,
                )
                dk = dk + jnp.einsum(
                    "bkgqs,bqkgd->bskd", ds.astype(qi.dtype), qi,
                    preferred_element_type=jnp.float32,
                )
                return (dk, dv), dq

            def skip(carry):
                return carry, jnp.zeros((b, bq, hkv, g, d), jnp.float32)

            return jax.lax.cond(mask.any(), grads, skip, carry)

        init = (
            jnp.zeros(kj.shape, jnp.float32),
            jnp.zeros(vj.shape, jnp.float32),
        )
        (dk, dv), dq = jax.lax.scan(q_step, init, (q, dout, lse, delta, qpos, qseg))
        return dq_acc + dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(
        kv_block, jnp.zeros(q.shape, jnp.float32), (k, v, kpos, kseg)
    )
    return (
        dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None
    )


_flash.defvjp(_flash_fwd, _flash_bwd)
