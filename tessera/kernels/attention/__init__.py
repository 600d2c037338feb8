"""Attention kernels behind one dispatch: `attention(q, k, v, ..., impl="auto")`.

impls, in the order auto tries them (`OP`, a `tessera.kernels.registry.Op`):
  pallas_tpu   `splash.attention`, jax's Pallas splash attention on TPU (or in interpret mode)
               under shard_map: index_aligned calls only (training, no-cache prefill), causal /
               bidirectional, packed segments, sliding window, soft cap, GQA / MQA, any head
               dims (Dv != D too), any length (padded to 128). Auto picks it for every call it
               supports.
  pallas_tpu_decode  `decode.attention`, TPU (or interpret mode), T = 1 over a cache: a Pallas
               kernel that DMAs only the kv blocks holding keys each row can see; no gradient.
  cudnn        `gpu.cudnn_attention`, cuDNN flash attention via jax.nn.dot_product_attention on a
               CUDA GPU: bf16 / f16, causal (+ window) or bidirectional, no segment ids.
  pallas_gpu   `gpu.pallas_attention`, jax's Pallas Triton flash attention (GPU or interpret
               mode): f32 / bf16 / f16, causal or bidirectional, packed segments, T == S.
  cpu_decode   `cpu.attention`, T = 1 over a cache on CPU: tessera's C++ kernel
               (`tessera.kernels.cpu`) splits the (batch row, kv head) items between the calling
               thread and a helper thread; float32, one device, no soft cap; XLA's gradient.
               Auto picks it in decode programs (traced under `tessera.kernels.cpu.decoding()`,
               as the Decoder's are).
  xla_decode   `reference.decode_attention`, T = 1 over a cache (decode step): the plain math as
               products reduced over one axis in the cache's [B, S, Hkv, D] layout, so XLA reads
               K and V once instead of copying them head-major for a batched dot every step.
               Auto picks it for every T = 1 call with a cache that no kernel above took.
  xla_chunked  `chunked.attention`, online softmax over a static schedule of (query block, key
               block) tiles with a blockwise custom backward; memory O(T + S) per head. Auto
               picks it once T * S >= CHUNKED_MIN_SCORES. With ``index_aligned=True`` it skips
               the tiles causal / window masking hides by index.
  xla          `reference.attention`, plain jnp; builds the [T, S] scores. CPU path and oracle;
               runs anything; ignores ``index_aligned`` (a skipping hint).
  auto         the first of these that accepts the inputs: pallas_tpu on TPU for index_aligned
               calls; cpu_decode, else xla_decode, for T = 1 over a cache; otherwise xla
               while T * S < CHUNKED_MIN_SCORES, xla_chunked above. More kernels join with
               `OP.register(impl, before=...)`.
"""

from __future__ import annotations

import jax

from tessera.kernels.attention import chunked, cpu, decode, gpu, reference, splash
from tessera.kernels.attention.reference import make_attention_mask
from tessera.kernels.registry import Impl, Op, drop_kwargs, impls_getattr

# Score entries per (batch, head) from which `auto` stops building the full [T, S] matrix:
# 2048 x 2048 float32 scores are 16 MiB per head, before the copies the backward keeps.
CHUNKED_MIN_SCORES = 2048 * 2048

__all__ = ["CHUNKED_MIN_SCORES", "IMPLS", "OP", "attention", "make_attention_mask"]


# Every impl and check takes `attention`'s arguments (less `impl`); `attention` rejects
# block sizes for a named xla, auto ignores them there.


def _chunked(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int | None, block_kv: int | None, **kw
) -> jax.Array:
    return chunked.attention(
        q, k, v, **kw,
        block_q=chunked.DEFAULT_BLOCK_Q if block_q is None else block_q,
        block_kv=chunked.DEFAULT_BLOCK_KV if block_kv is None else block_kv,
    )


def _chunked_pays(q: jax.Array, k: jax.Array, *args, **kw) -> str | None:
    scores = q.shape[1] * k.shape[1]
    if scores < CHUNKED_MIN_SCORES:
        return f"T * S = {scores} < CHUNKED_MIN_SCORES = {CHUNKED_MIN_SCORES}"
    return None


def _one_query(q: jax.Array, k: jax.Array, *args, **kw) -> str | None:
    if q.shape[1] != 1:
        return f"one query token per row only (decode), got T = {q.shape[1]}"
    if kw.get("index_aligned"):
        return "index_aligned self attention (no cache)"
    return None


OP = Op(
    "attention",
    [
        Impl("pallas_tpu", splash.attention, supports=splash.supports),
        Impl("pallas_tpu_decode", decode.attention, supports=decode.supports),
        Impl("cudnn", gpu.cudnn_attention, supports=gpu.cudnn_supports),
        Impl("pallas_gpu", gpu.pallas_attention, supports=gpu.pallas_supports,
             auto=gpu.pallas_auto),
        Impl("cpu_decode", cpu.attention, supports=cpu.supports, auto=cpu.auto),
        Impl("xla_decode", drop_kwargs(reference.decode_attention, "block_q", "block_kv",
                                       "index_aligned"), supports=_one_query),
        Impl("xla_chunked", _chunked, auto=_chunked_pays),
        Impl("xla", drop_kwargs(reference.attention, "block_q", "block_kv", "index_aligned")),
    ],
)

__getattr__ = impls_getattr(OP)  # IMPLS = ("auto", *OP.names)


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
    impl: str = "auto",
    block_q: int | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """Masked attention, q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] -> [B, T, Hq, Dv].

    Masking contract in `reference.attention`. block_q / block_kv tune xla_chunked (defaults from
    `chunked`); `auto` ignores them when it picks xla, impl='xla' rejects them.

    ``index_aligned=True`` promises that query i and key i are the same token (self attention
    over one sequence with no cache: T == S, q_positions is kv_positions, and within a segment
    positions rise by one per index, 0, 1, 2, ... as packing makes them), so masking by position
    equals masking by index. It never changes the result of a call that keeps the promise: xla
    ignores it, xla_chunked then skips the tiles causal / sliding-window masking hides entirely
    (it needs only positions that strictly increase), and index-masked kernels (Pallas TPU)
    accept only such calls.

    ``logit_soft_cap=c`` squashes the scaled scores to ``c * tanh(s / c)`` before masking.
    """
    if impl == "xla" and (block_q is not None or block_kv is not None):
        given = [n for n, s in (("block_q", block_q), ("block_kv", block_kv)) if s is not None]
        raise ValueError(f"{', '.join(given)} only apply to impl='xla_chunked', not 'xla'")
    return OP(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
        kv_valid=kv_valid, index_aligned=index_aligned, logit_soft_cap=logit_soft_cap,
        block_q=block_q, block_kv=block_kv, impl=impl,
    )
