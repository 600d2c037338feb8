"""Multi-head attention with grouped KV heads (MHA / GQA / MQA), RoPE and a KV cache.

``model.causal=False`` makes it bidirectional (ViT), ``model.rope=False`` drops the rotary
embedding (models with absolute position embeddings), ``model.qkv_bias`` / ``model.attn_out_bias``
add biases ``bq``, ``bk``, ``bv`` [H(kv), Dh] / ``bo`` [D]. ``cross`` attends learned queries over
a sequence (attention pooling) with the same parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.kernels.attention import attention
from tessera.kernels.dense import dense, dense_many
from tessera.layers.base import cast, normal, param, zeros
from tessera.layers.mixers.base import Aux, SeqInfo, decode_keys, write_cache
from tessera.layers.norms import RMSNorm
from tessera.layers.positions import apply_rope, rope_frequencies
from tessera.sharding import constrain


class Attention(nnx.Module):
    """[B, T, D] -> [B, T, D]. Optional qkv bias (Qwen2), q/k RMSNorm (Qwen3), sliding window,
    output bias, no RoPE, bidirectional."""

    REMAT_SAVED = ("query_proj", "key_proj", "value_proj", "attn_out")
    LOGICAL_RULES: dict[str, tuple[str, ...]] = {}  # uses the shared names only
    CAUSAL_SCORES = True

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        d, h, kvh, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if h % kvh:
            raise ValueError(f"num_heads={h} is not a multiple of num_kv_heads={kvh}")
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
        self.dtype = jnp.dtype(cfg.dtype)
        self.sliding_window = int(cfg.sliding_window) or None
        self.causal = bool(cfg.causal)
        self.logit_soft_cap = float(cfg.logit_soft_cap) or None
        self.rope = bool(cfg.rope)
        self.impl = cfg.attention_impl
        self.dense_impl = cfg.get("dense_impl", "auto")
        self.rope_theta = float(cfg.rope_theta)
        self.rope_scaling = dict(cfg.rope_scaling)
        self.max_seq_len = int(cfg.max_seq_len)
        init, pd = normal(cfg.init_std), cfg.param_dtype
        self.wq = param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.wk = param(rngs, init, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.wv = param(rngs, init, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.wo = param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), pd)
        self.bo = param(rngs, zeros, (d,), ("embed",), pd) if cfg.attn_out_bias else None
        if cfg.qkv_bias:
            self.bq = param(rngs, zeros, (h, hd), ("heads", "head_dim"), pd)
            self.bk = param(rngs, zeros, (kvh, hd), ("kv_heads", "head_dim"), pd)
            self.bv = param(rngs, zeros, (kvh, hd), ("kv_heads", "head_dim"), pd)
        else:
            self.bq = self.bk = self.bv = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
            self.k_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None

    def _project(self, x: jax.Array, w: nnx.Param, b: nnx.Param | None) -> jax.Array:
        y = dense(x, cast(w, self.dtype), impl=self.dense_impl)
        return y if b is None else y + cast(b, self.dtype)

    def _project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> q [B, T, H, Dh], k and v [B, T, Hkv, Dh] (one dense call: the CPU
        decode kernel splits the three products across threads as one job)."""
        ys = dense_many(
            x, tuple(cast(w, self.dtype) for w in (self.wq, self.wk, self.wv)),
            impl=self.dense_impl,
        )
        biases = (self.bq, self.bk, self.bv)
        return tuple(y if b is None else y + cast(b, self.dtype) for y, b in zip(ys, biases))

    def _output(self, out: jax.Array) -> jax.Array:
        """Heads [B, T, H, Dh] -> [B, T, D] through ``wo`` (and ``bo``)."""
        out = checkpoint_name(constrain(out, ("batch", "length", "act_heads", None)), "attn_out")
        y = dense(out, cast(self.wo, self.dtype), contract=2, impl=self.dense_impl)
        if self.bo is not None:
            y = y + cast(self.bo, self.dtype)
        return constrain(y, ("batch", "length", "act_embed"))

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None
    ) -> tuple[jax.Array, dict | None, Aux]:
        q, k, v = self._project_qkv(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            inv_freq, factor = rope_frequencies(
                self.head_dim,
                theta=self.rope_theta,
                scaling=self.rope_scaling,
                max_position=self.max_seq_len,
            )
            q = apply_rope(q, info.positions, inv_freq, factor)
            k = apply_rope(k, info.positions, inv_freq, factor)
        q = checkpoint_name(constrain(q, ("batch", "length", "act_heads", None)), "query_proj")
        k = checkpoint_name(constrain(k, ("batch", "length", "act_kv_heads", None)), "key_proj")
        v = checkpoint_name(constrain(v, ("batch", "length", "act_kv_heads", None)), "value_proj")

        kv_k, kv_v, kv_pos, kv_seg = k, v, info.positions, info.segment_ids
        new_cache = None
        if cache is not None and q.shape[1] == 1:
            # Decode step: this token's k/v go into the cache first and the query attends over
            # the updated cache alone, so a kernel reads only the slots in use (no concat copy).
            new_cache = {
                "k": write_cache(cache["k"], k, info.write_slots),
                "v": write_cache(cache["v"], v, info.write_slots),
            }
            # Written once, in place, then read: without the barrier XLA (CPU) re-does the
            # write inside each consumer fusion that sees the cache in another shape, and copies
            # the whole cache for each (measured: 3 copies per layer and step).
            new_cache = jax.lax.optimization_barrier(new_cache)
            kv_k, kv_v = new_cache["k"].astype(k.dtype), new_cache["v"].astype(v.dtype)
            kv_pos, kv_seg = decode_keys(info)
            q_seg = (info.segment_ids > 0).astype(jnp.int32)
        elif cache is not None:
            # Keys are the cache as it was plus this call's tokens; then this call's tokens are
            # written into their slots for the next call.
            old_seg = (info.cache_positions >= 0).astype(jnp.int32)
            kv_k = jnp.concatenate([cache["k"].astype(k.dtype), k], axis=1)
            kv_v = jnp.concatenate([cache["v"].astype(v.dtype), v], axis=1)
            kv_pos = jnp.concatenate([info.cache_positions, info.positions], axis=1)
            kv_seg = jnp.concatenate([old_seg, (info.segment_ids > 0).astype(jnp.int32)], axis=1)
            q_seg = (info.segment_ids > 0).astype(jnp.int32)
            new_cache = {
                "k": write_cache(cache["k"], k, info.write_slots),
                "v": write_cache(cache["v"], v, info.write_slots),
            }
        else:
            q_seg = info.segment_ids
        out = attention(
            q,
            kv_k,
            kv_v,
            impl=self.impl,
            q_positions=info.positions,
            kv_positions=kv_pos,
            q_segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            causal=self.causal,
            sliding_window=self.sliding_window,
            # No cache: the keys are this call's tokens, query i is key i (positions rise). The
            # hint only lets the kernel skip what causal / window masking hides by index, so it
            # holds for bidirectional attention too (then nothing is skipped but the window).
            index_aligned=cache is None,
            logit_soft_cap=self.logit_soft_cap,
        )
        return self._output(out), new_cache, {}

    def cross(self, queries: jax.Array, x: jax.Array) -> jax.Array:
        """Queries [B, Tq, D] attend, bidirectionally and without positions, over x [B, T, D]
        (every token of every row) -> [B, Tq, D]: multihead attention pooling (MAP)."""
        q = self._project(queries, self.wq, self.bq)
        k, v = (self._project(x, w, b) for w, b in ((self.wk, self.bk), (self.wv, self.bv)))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        b, tq, t = q.shape[0], q.shape[1], k.shape[1]
        out = attention(
            q,
            k,
            v,
            impl=self.impl,
            q_positions=jnp.zeros((b, tq), jnp.int32),
            kv_positions=jnp.zeros((b, t), jnp.int32),
            causal=False,
            logit_soft_cap=self.logit_soft_cap,
        )
        return self._output(out)

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        """q/k/v/o projections plus scores and weighted values over ``seq_len`` keys: dense
        attention computes the whole T x T block, causal, windowed or bidirectional alike."""
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        proj = 2 * cfg.d_model * (q + 2 * kv) + 2 * q * cfg.d_model
        return proj + 2 * 2 * seq_len * q

    @staticmethod
    def init_cache(cfg: ConfigDict, batch: int, length: int, dtype: jnp.dtype) -> dict:
        """KV arrays [B, S, Hkv, Dh]; S is the window for sliding-window models (ring buffer)."""
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    @staticmethod
    def cache_axes() -> dict:
        names = ("cache_batch", "cache_length", "cache_kv_heads", "head_dim")
        return {"k": names, "v": names}
