"""Decode attention on TPU (Pallas Mosaic): one query token per row over a KV cache, reading only
the cache blocks that hold a key the row can see.

q [B, 1, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] (the cache in its own contiguous layout,
slots filled from 0; a ring buffer for sliding-window models) -> [B, 1, Hq, Dv].

The mask (positions, segment ids, kv_valid, causal, window) is one row per sequence when T = 1,
so it is computed up front in jnp on [B, S]; from it each row gets the range of kv blocks
holding any visible key, passed by scalar prefetch. The grid is (batch, kv head group, kv
block); a step past a row's range maps K/V to the range's last block (an unchanged block index
is not fetched again) and skips its compute, so blocks outside the range are never DMA'd. In a
visited block the full mask, the custom scale and the soft cap apply as in `reference`; the
online softmax state lives in VMEM scratch. All query heads of a kv head are one block (GQA and
MQA without repeating K/V); Dv may differ from D. Every row runs all S / block_kv grid steps;
a skipped step costs the grid's per-step overhead only.

Keys may come in parts whose scores add up, and the values may be the first part: MLA's absorbed
form (`latent_attention`: one shared key head [latent | k_rope], values the latent) reads each
latent block once and never builds the concatenated keys.

jax's shipped decode kernels do not fit this cache: ``paged_attention`` wants head-major pages
[Hkv, pages, page_size, D] and ``ragged_paged_attention`` K and V interleaved in one page array
with one head size; both mask by length only (a valid prefix), not by positions / segments /
ring-buffer slots. Re-laying the cache out every step would cost what the kernel saves.

No gradient: decode does not train (differentiating raises NotImplementedError).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tessera.kernels.attention.reference import MASK_VALUE, check_inputs, make_attention_mask
from tessera.kernels.platform import (
    LANES,
    heads_filling_lanes,
    interpret,
    kernel_platform_reason,
    target_device,
)
from tessera.sharding.kernels import shard_map_kernel

# Keys per kv block by device kind (jax.Device.device_kind); "default" for any other. A block is
# a multiple of 128 (lanes of the mask row); a cache no longer than it is one block.
BLOCK_KV = {"default": 512}


def supports(q: jax.Array, k: jax.Array, v: jax.Array, **kw) -> str | None:
    """None when the kernel can run these inputs, else why not (static facts only)."""
    reason = kernel_platform_reason("tpu")
    if reason is not None:
        return reason
    if q.ndim == 4 and q.shape[1] != 1:
        return f"decode only: T = {q.shape[1]} > 1"
    if kw.get("index_aligned"):
        return "index_aligned self attention (no cache)"
    block_kv = kw.get("block_kv")
    if block_kv is not None and block_kv % LANES:
        return f"block_kv = {block_kv} is not a multiple of {LANES}"
    return None


def _block_kv(block_kv: int | None) -> int:
    if block_kv is not None:
        return block_kv
    return BLOCK_KV.get(target_device().device_kind, BLOCK_KV["default"])


def block_range(visible: jax.Array, bkv: int) -> tuple[jax.Array, jax.Array]:
    """visible bool [B, S'] (S' a multiple of bkv) -> (first block, number of blocks) int32 [B]
    spanning every visible key; (0, 0) for a row that sees none."""
    s = visible.shape[1]
    seen = visible.any(axis=1)
    first = jnp.argmax(visible, axis=1) // bkv
    last = (s - 1 - jnp.argmax(visible[:, ::-1], axis=1)) // bkv
    lo = jnp.where(seen, first, 0).astype(jnp.int32)
    return lo, jnp.where(seen, last - first + 1, 0).astype(jnp.int32)


def visited_block(t, lo, n):
    """The kv block a row with range (lo, n) reads at grid step t: its range's blocks in order,
    then the last one again (not fetched again, its compute skipped)."""
    return lo + jnp.minimum(t, jnp.maximum(n - 1, 0))


def _kernel(lo_ref, n_ref, *refs, parts: int, dims: tuple[int, ...], dv: int, shared_v: bool,
            scale: float, soft_cap: float | None):
    """refs: ``parts`` query blocks [hb, G, D_i], ``parts`` key blocks [bkv, hb * D_i], the value
    block [bkv, hb * Dv] unless ``shared_v`` (values: the first key part), the mask as a row
    [1, bkv] and a column [bkv, 1], the output block [hb, G, Dv], scratch m, l [hb, G, 1] and
    acc [hb, G, Dv]. A head's scores sum the parts' q_i k_i^T."""
    q_refs, k_refs = refs[:parts], refs[parts:2 * parts]
    rest = refs[2 * parts:]
    v_ref = k_refs[0] if shared_v else rest[0]
    row_ref, col_ref, o_ref, m_sc, l_sc, acc_sc = rest[0 if shared_v else 1:]
    b, t = pl.program_id(0), pl.program_id(2)
    # float32 products in full (as the reference); bfloat16 ones are exact in one pass (Mosaic
    # rejects a float32-precision bfloat16 matmul, which jax_default_matmul_precision may ask).
    full = q_refs[0].dtype == jnp.float32
    precision = jax.lax.Precision.HIGHEST if full else jax.lax.Precision.DEFAULT

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(t < n_ref[b])
    def _step():
        row = row_ref[...] != 0  # [1, bkv]: which keys of the block the query sees
        col = col_ref[...] != 0  # [bkv, 1]: the same, down the keys
        for h in range(m_sc.shape[0]):
            s = sum(
                jax.lax.dot_general(q_ref[h], k_ref[:, h * d:(h + 1) * d],
                                    (((1,), (1,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32)
                for q_ref, k_ref, d in zip(q_refs, k_refs, dims)
            ) * scale  # [G, bkv]
            # Slots the row cannot see may hold anything (stale, or past the cache's end).
            v = jnp.where(col, v_ref[:, h * dv:(h + 1) * dv], 0)  # [bkv, Dv]
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(row, s, MASK_VALUE)
            m_prev = m_sc[h]  # [G, 1]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            p = jnp.where(row, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_sc[h] = alpha * l_sc[h] + p.sum(axis=1, keepdims=True)
            acc_sc[h] = alpha * acc_sc[h] + jnp.dot(p.astype(v.dtype), v, precision=precision,
                                                    preferred_element_type=jnp.float32)
            m_sc[h] = m_new

    @pl.when(t == pl.num_programs(2) - 1)
    def _finish():
        denom = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


def _per_shard(visible: jax.Array, v: jax.Array | None, *qk: jax.Array, scale: float,
               soft_cap: float | None, block_kv: int) -> jax.Array:
    """One device's rows and heads: visible bool [B, S]; v [B, S, Hkv, Dv], or None when the
    values are the first key part; qk: pairs q_i [B, 1, Hq, D_i], k_i [B, S, Hkv, D_i] whose
    scores add up -> [B, 1, Hq, Dv]."""
    qs, ks = qk[0::2], qk[1::2]
    b, _, hq, _ = qs[0].shape
    s, hkv = ks[0].shape[1], ks[0].shape[2]
    dims = tuple(k.shape[3] for k in ks)
    dv = dims[0] if v is None else v.shape[3]
    g = hq // hkv
    bkv = s if s <= block_kv else block_kv
    nblk = pl.cdiv(s, bkv)
    # Only the mask is padded (cheap, [B, S]): the cache's last block may run past S, and the
    # kernel masks what it reads there.
    visible = jnp.pad(visible, ((0, 0), (0, nblk * bkv - s)))
    lo, n = block_range(visible, bkv)
    hb = heads_filling_lanes(hkv, (*dims, dv))  # a block: [block_kv, hb * D] of the cache
    mask = visible.astype(jnp.int32)

    def kv_block(bi, j, t, lo_ref, n_ref):
        return visited_block(t, lo_ref[bi], n_ref[bi])

    def kv_map(bi, j, t, lo_ref, n_ref):
        return bi, kv_block(bi, j, t, lo_ref, n_ref), j

    def row_map(bi, j, t, lo_ref, n_ref):
        return bi, 0, kv_block(bi, j, t, lo_ref, n_ref)

    def col_map(bi, j, t, lo_ref, n_ref):
        return bi, kv_block(bi, j, t, lo_ref, n_ref), 0

    def head_map(bi, j, t, lo_ref, n_ref):
        return bi, j, 0, 0

    sq = pl.squeezed
    values = [] if v is None else [v.reshape(b, s, hkv * dv)]
    value_specs = [] if v is None else [pl.BlockSpec((sq, bkv, hb * dv), kv_map)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv // hb, nblk),
        in_specs=[
            *(pl.BlockSpec((sq, hb, g, d), head_map) for d in dims),
            *(pl.BlockSpec((sq, bkv, hb * d), kv_map) for d in dims),
            *value_specs,
            pl.BlockSpec((sq, 1, bkv), row_map),
            pl.BlockSpec((sq, bkv, 1), col_map),
        ],
        out_specs=pl.BlockSpec((sq, hb, g, dv), head_map),
        scratch_shapes=[
            pltpu.VMEM((hb, g, 1), jnp.float32),
            pltpu.VMEM((hb, g, 1), jnp.float32),
            pltpu.VMEM((hb, g, dv), jnp.float32),
        ],
    )
    kernel = functools.partial(_kernel, parts=len(dims), dims=dims, dv=dv, shared_v=v is None,
                               scale=scale, soft_cap=soft_cap)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, dv), qs[0].dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret(),
        name="tessera_decode_attention",
    )(
        lo, n, *(q.reshape(b, hkv, g, d) for q, d in zip(qs, dims)),
        *(k.reshape(b, s, hkv * d) for k, d in zip(ks, dims)), *values,
        mask[:, None, :], mask[:, :, None],
    )
    return out.reshape(b, 1, hq, dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _decode(scale, soft_cap, block_kv, visible, v, *qk):
    """`_per_shard` under shard_map: rows split over batch, q's and k's heads together (GQA)."""
    heads = ("batch", None, "act_heads", None)
    run = shard_map_kernel(
        functools.partial(_per_shard, scale=scale, soft_cap=soft_cap, block_kv=block_kv),
        in_axes=(("batch", None), heads, *(heads for _ in qk)),
        out_axes=heads,
    )
    return run(visible, v, *qk)


def _decode_fwd(scale, soft_cap, block_kv, *args):
    return _decode(scale, soft_cap, block_kv, *args), None


def _decode_bwd(scale, soft_cap, block_kv, res, g):
    raise NotImplementedError(
        "attention impl 'pallas_tpu_decode' has no gradient (decode does not train); "
        "use impl='xla' or 'xla_chunked' to differentiate"
    )


_decode.defvjp(_decode_fwd, _decode_bwd)


def _checked_row_mask(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                      causal, sliding_window, scale, kv_valid, logit_soft_cap):
    """Check a decode call's inputs (k / v may be shape structs) and return the one query row's
    visibility mask bool [B, S] and the softmax scale (default 1 / sqrt(q's features))."""
    check_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                 sliding_window, kv_valid, logit_soft_cap)
    if q.shape[1] != 1:
        raise ValueError(f"decode attention takes one query token per row, got T = {q.shape[1]}")
    visible = make_attention_mask(
        q_positions, kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        causal=causal, sliding_window=sliding_window, kv_valid=kv_valid,
    )[:, 0]
    return visible, q.shape[-1] ** -0.5 if scale is None else float(scale)


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
    block_q: int | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """`reference.attention` for T = 1 with the Pallas decode kernel: q [B, 1, Hq, D], k [B, S,
    Hkv, D], v [B, S, Hkv, Dv] -> [B, 1, Hq, Dv]. ``block_kv`` keys per kv block (a multiple of
    128; default from ``BLOCK_KV``); ``block_q`` and ``index_aligned`` do not apply."""
    visible, scale = _checked_row_mask(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal,
        sliding_window, scale, kv_valid, logit_soft_cap,
    )
    return _decode(scale, logit_soft_cap, _block_kv(block_kv), visible, v, q, k)


def latent_attention(
    q: jax.Array,
    latent: jax.Array,
    k_rope: jax.Array,
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
    block_kv: int | None = None,
) -> jax.Array:
    """MLA's absorbed decode step: q [B, 1, H, R + Dr] over one shared key head [latent | k_rope]
    (latent [B, S, R], k_rope [B, S, Dr]) with values the latent -> [B, 1, H, R]; equals
    ``attention(q, concat([latent, k_rope])[:, :, None], latent[:, :, None], ...)``. The kernel
    reads each latent block once, as key features and as values, and never builds the concat
    (a copy of the whole cache per step)."""
    r = latent.shape[-1]
    keys = jax.ShapeDtypeStruct((*latent.shape[:2], 1, r + k_rope.shape[-1]), latent.dtype)
    values = jax.ShapeDtypeStruct((*latent.shape[:2], 1, r), latent.dtype)
    visible, scale = _checked_row_mask(
        q, keys, values, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal,
        sliding_window, scale, kv_valid, logit_soft_cap,
    )
    return _decode(scale, logit_soft_cap, _block_kv(block_kv), visible, None,
                   q[..., :r], latent[:, :, None], q[..., r:], k_rope[:, :, None])
