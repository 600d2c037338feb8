"""Memory-efficient XLA attention: online softmax over (query block, key block) tiles.

The [T, S] score matrix is never built. Queries are cut into blocks of `block_q` rows and keys
into blocks of `block_kv`; the kernel runs over a *tile schedule*, a static list of (query block,
key block) pairs fixed at trace time:

- forward: one scan over the pairs sorted by query block. The carry holds the running max,
  normaliser and output of the current query block (reset at its first pair) plus the output and
  row-logsumexp buffers, into which the block's normalised result is written (dynamic update) at
  every step; the last write of a block is its final value. Only the output and the logsumexp are
  saved for the backward.
- backward (a `jax.custom_vjp`): one scan over the same pairs sorted by key block. The carry
  holds dk / dv of the current key block (written to their buffers like the forward's output) and
  a float32 dq buffer [nq, ...] to which each tile adds its share; each score tile is recomputed
  from the saved logsumexp. Training memory is O(T + S) per head; nothing is stacked per tile.

The mask (positions, segment ids, kv_valid) is applied inside every visited tile, so the result
never depends on which tiles the schedule holds as long as it holds every tile with a visible
entry. Without a hint the schedule is every pair (dense). With ``index_aligned=True`` (self
attention over one sequence with no cache, T == S: query i and key i are the same token, and
positions strictly increase with the index within a segment) it keeps only the pairs that can hold
an entry with key index <= query index under causal masking and query - key < sliding_window
under a window: the lower block triangle, cut to a band by the window, for any block_q / block_kv.
There is no `lax.cond`: skipped tiles are simply not in the loop.

The loops go through `tessera.kernels.loops.scan`, so inside `loops.unrolled()` (cost mode) they
unroll fully and XLA's `cost_analysis()` counts every visited tile. Lengths that are not
multiples of the block sizes are padded internally (padding is segment 0, which no query sees).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tessera.kernels import loops
from tessera.kernels.attention.reference import MASK_VALUE, check_inputs, make_attention_mask

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512

# (query block, key block) pairs, sorted by query block then key block.
Schedule = tuple[tuple[int, int], ...]


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
    index_aligned: bool = False,
    logit_soft_cap: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
) -> jax.Array:
    """Blockwise attention, same contract as `reference.attention`.

    q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] -> [B, T, Hq, Dv] in q's dtype.
    block_q / block_kv are clipped to T / S, so a decode step (T=1) runs a single query row.

    ``index_aligned=True`` promises that query i and key i are the same token (T == S,
    q_positions is kv_positions) and that within a segment positions strictly increase with the
    index (0, 1, 2, ... in practice), so a key after the query (j > i) is never visible and
    q_pos - kv_pos >= i - j; the kernel then skips the tiles that causal / sliding-window masking
    hides by index (see `tile_schedule`). It is a hint only: the mask is still applied in full
    inside every visited tile, and it is ignored when T != S. A call that breaks the promise can
    lose keys it should see.
    """
    check_inputs(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window, kv_valid,
        logit_soft_cap,
    )
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_kv={block_kv}")
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    bq, bk = min(block_q, t), min(block_kv, s)
    nq, nk = math.ceil(t / bq), math.ceil(s / bk)
    schedule = tile_schedule(
        t, s, bq, bk, causal=causal, sliding_window=sliding_window,
        index_aligned=index_aligned and t == s,
    )

    # Everything is one segment unless told otherwise; empty cache slots and the padding added
    # below become segment 0, which no query attends.
    if q_segment_ids is None:
        q_segment_ids = jnp.ones((b, t), jnp.int32)
        kv_segment_ids = jnp.ones((b, s), jnp.int32)
    if kv_valid is not None:
        kv_segment_ids = jnp.where(kv_valid, kv_segment_ids, 0)

    cap = None if logit_soft_cap is None else float(logit_soft_cap)
    out = _flash(
        causal,
        sliding_window,
        (float(scale), cap),
        schedule,
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


def tile_schedule(
    t: int,
    s: int,
    block_q: int,
    block_kv: int,
    *,
    causal: bool,
    sliding_window: int | None,
    index_aligned: bool,
) -> Schedule:
    """The (query block, key block) pairs the kernel visits, sorted by query block.

    Dense (every pair) unless ``index_aligned``; then a pair is kept when some query row r and
    key column c in it (real rows and columns, not padding) satisfy the index mask: c <= r if
    causal, r - c < sliding_window if windowed. Over a tile, r - c spans the whole integer range
    [r_first - c_last, r_last - c_first], so the test is an interval overlap.
    """
    nq, nk = math.ceil(t / block_q), math.ceil(s / block_kv)
    pairs = []
    for i in range(nq):
        r_first, r_last = i * block_q, min((i + 1) * block_q, t) - 1
        for j in range(nk):
            c_first, c_last = j * block_kv, min((j + 1) * block_kv, s) - 1
            if index_aligned:
                if causal and r_last - c_first < 0:
                    continue
                if sliding_window is not None and r_first - c_last >= sliding_window:
                    continue
            pairs.append((i, j))
    return tuple(pairs)


def _to_blocks(x: jax.Array, n: int, size: int) -> jax.Array:
    """[B, L, ...] -> [n, B, size, ...], zero-padding L up to n * size."""
    pad = [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def _steps(pairs: list[tuple[int, int]]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scan inputs for pairs (outer, inner) grouped by outer block: the two block indices and
    whether the step is the first of its outer block."""
    idx = np.asarray(pairs, np.int32).reshape(-1, 2)
    first = np.ones(len(idx), bool)
    first[1:] = idx[1:, 0] != idx[:-1, 0]
    return jnp.asarray(idx[:, 0]), jnp.asarray(idx[:, 1]), jnp.asarray(first)


def _block(x: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _set_block(x: jax.Array, value: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), i, 0)


def _tile_mask(qpos, kpos, qseg, kseg, causal, window):
    """bool [B, 1, 1, bq, bk] for one (query block, key block) tile."""
    mask = make_attention_mask(
        qpos, kpos, q_segment_ids=qseg, kv_segment_ids=kseg, causal=causal, sliding_window=window
    )
    return mask[:, None, None]


def _scores(qi, kj, mask, scaling):
    """float32 [B, Hkv, G, bq, bk] scores of a tile, masked entries set to MASK_VALUE, and the
    soft cap's derivative d capped / d raw (None without a cap). ``scaling`` is (scale, cap)."""
    scale, cap = scaling
    s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    dcap = None
    if cap is not None:
        th = jnp.tanh(s / cap)
        s, dcap = cap * th, 1.0 - th * th
    return jnp.where(mask, s, MASK_VALUE), dcap


def _forward(causal, window, scaling, schedule, q, k, v, qpos, kpos, qseg, kseg):
    """Returns out [nq, B, bq, Hkv, G, Dv] (q's dtype) and logsumexp [nq, B, Hkv, G, bq] (f32)."""
    nq, b, bq, hkv, g, _ = q.shape
    dv = v.shape[-1]
    fresh = (
        jnp.full((b, hkv, g, bq), MASK_VALUE, jnp.float32),
        jnp.zeros((b, hkv, g, bq), jnp.float32),
        jnp.zeros((b, hkv, g, bq, dv), jnp.float32),
    )

    def step(carry, xs):
        state, out, lse = carry
        i, j, first = xs
        m, denom, acc = (jnp.where(first, f, c) for f, c in zip(fresh, state, strict=True))
        qi, kj, vj = _block(q, i), _block(k, j), _block(v, j)
        mask = _tile_mask(_block(qpos, i), _block(kpos, j), _block(qseg, i), _block(kseg, j),
                          causal, window)
        s, _ = _scores(qi, kj, mask, scaling)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        pv = jnp.einsum(
            "bkgqs,bskd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
        )
        denom = alpha * denom + p.sum(axis=-1)
        acc = alpha[..., None] * acc + pv
        # Write the block's result so far; its last pair leaves the final value.
        seen = denom > 0
        out_i = acc / jnp.where(seen, denom, 1.0)[..., None]
        # Rows that see no key keep logsumexp 0: with every score masked, the backward's
        # exp(MASK_VALUE - 0) is exactly 0, so they get zero gradient.
        lse_i = jnp.where(seen, m_new + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
        out = _set_block(out, jnp.einsum("bkgqd->bqkgd", out_i), i)
        lse = _set_block(lse, lse_i, i)
        return ((m_new, denom, acc), out, lse), None

    init = (
        fresh,
        jnp.zeros((nq, b, bq, hkv, g, dv), q.dtype),
        jnp.zeros((nq, b, hkv, g, bq), jnp.float32),
    )
    (_, out, lse), _ = loops.scan(step, init, _steps(list(schedule)))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flash(causal, window, scaling, schedule, q, k, v, qpos, kpos, qseg, kseg):
    """Blocked attention on pre-blocked inputs (see `_to_blocks`); returns blocked output."""
    return _forward(causal, window, scaling, schedule, q, k, v, qpos, kpos, qseg, kseg)[0]


def _flash_fwd(causal, window, scaling, schedule, q, k, v, qpos, kpos, qseg, kseg):
    out, lse = _forward(causal, window, scaling, schedule, q, k, v, qpos, kpos, qseg, kseg)
    return out, (q, k, v, qpos, kpos, qseg, kseg, out, lse)


def _flash_bwd(causal, window, scaling, schedule, res, dout):
    """One scan over the schedule sorted by key block: dk, dv of the current key block in the
    carry, each tile's dq added into a carried float32 [nq, ...] buffer."""
    q, k, v, qpos, kpos, qseg, kseg, out, lse = res
    nk = k.shape[0]
    delta = jnp.einsum(
        "nbqkgd,nbqkgd->nbkgq", dout.astype(jnp.float32), out.astype(jnp.float32)
    )  # [nq, B, Hkv, G, bq]
    fresh = (jnp.zeros(k.shape[1:], jnp.float32), jnp.zeros(v.shape[1:], jnp.float32))

    def step(carry, xs):
        state, dq, dk, dv = carry
        j, i, first = xs
        dk_j, dv_j = (jnp.where(first, f, c) for f, c in zip(fresh, state, strict=True))
        qi, kj, vj, doi = _block(q, i), _block(k, j), _block(v, j), _block(dout, i)
        mask = _tile_mask(_block(qpos, i), _block(kpos, j), _block(qseg, i), _block(kseg, j),
                          causal, window)
        s, dcap = _scores(qi, kj, mask, scaling)
        p = jnp.exp(s - _block(lse, i)[..., None])
        dv_j = dv_j + jnp.einsum(
            "bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - _block(delta, i)[..., None]) * scaling[0]
        if dcap is not None:
            ds = ds * dcap
        dq_i = jnp.einsum(
            "bkgqs,bskd->bqkgd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32
        )
        dk_j = dk_j + jnp.einsum(
            "bkgqs,bqkgd->bskd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32
        )
        dq = _set_block(dq, _block(dq, i) + dq_i, i)
        # The key block's last pair leaves its final dk, dv.
        dk, dv = _set_block(dk, dk_j, j), _set_block(dv, dv_j, j)
        return ((dk_j, dv_j), dq, dk, dv), None

    by_key = sorted((j, i) for i, j in schedule)
    init = (
        fresh,
        jnp.zeros(q.shape, jnp.float32),
        jnp.zeros((nk, *k.shape[1:]), k.dtype),
        jnp.zeros((nk, *v.shape[1:]), v.dtype),
    )
    (_, dq, dk, dv), _ = loops.scan(step, init, _steps(by_key))
    return dq.astype(q.dtype), dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
