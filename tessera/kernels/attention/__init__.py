"""Attention kernels behind one dispatch: `attention(q, k, v, ..., impl="auto")`.

impls:
  xla          `reference.attention`, plain jnp; builds the [T, S] scores. CPU path and oracle.
  xla_chunked  `chunked.attention`, online softmax over blocks with a blockwise custom backward;
               memory O(T + S) per head.
  pallas_tpu, pallas_gpu  not written yet; naming one raises NotImplementedError.
  auto         xla while T * S < CHUNKED_MIN_SCORES, xla_chunked above. Never picks Pallas yet.
"""

from __future__ import annotations

import jax

from tessera.kernels.attention import chunked, reference
from tessera.kernels.attention.reference import make_attention_mask
from tessera.kernels.dispatch import check_impl

IMPLS = ("auto", "xla", "xla_chunked", "pallas_tpu", "pallas_gpu")

# Score entries per (batch, head) from which `auto` stops building the full [T, S] matrix:
# 2048 x 2048 float32 scores are 16 MiB per head, before the copies the backward keeps.
CHUNKED_MIN_SCORES = 2048 * 2048

__all__ = ["CHUNKED_MIN_SCORES", "IMPLS", "attention", "make_attention_mask"]


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
    impl: str = "auto",
    block_q: int | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """Masked attention, q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] -> [B, T, Hq, Dv].

    Masking contract in `reference.attention`. block_q / block_kv tune xla_chunked (defaults from
    `chunked`); `auto` ignores them when it picks xla, impl='xla' rejects them.
    """
    check_impl("attention", impl, IMPLS)
    chosen = impl
    if impl == "auto":
        chosen = "xla_chunked" if q.shape[1] * k.shape[1] >= CHUNKED_MIN_SCORES else "xla"
    kw = dict(
        q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
        kv_valid=kv_valid,
    )
    blocks = {
        name: size for name, size in (("block_q", block_q), ("block_kv", block_kv))
        if size is not None
    }
    if chosen == "xla_chunked":
        return chunked.attention(q, k, v, **kw, **blocks)
    if blocks and impl == "xla":
        raise ValueError(f"{', '.join(blocks)} only apply to impl='xla_chunked', not 'xla'")
    return reference.attention(q, k, v, **kw)
