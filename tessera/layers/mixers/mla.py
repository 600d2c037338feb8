"""Multi-head latent attention (MLA, DeepSeek-V2 / V3): keys and values from one low-rank latent.

Sizes (``model.mla``): H = ``model.num_heads`` heads; per head a query of Dn = qk_nope_head_dim
features without RoPE then Dr = qk_rope_head_dim with RoPE (q = [nope | rope]), Dv = v_head_dim
value features; R = kv_lora_rank latent features per token, Q = q_lora_rank (0: no query
compression, DeepSeek-V2-Lite).

Parameters (logical axes):
  wq       [D, H, Dn + Dr]   (embed, heads, head_dim)       Q == 0 only
  wq_a     [D, Q]            (embed, q_lora)                Q > 0: x -> compressed query
  q_norm   RMSNorm over Q (eps = model.mla.norm_eps)
  wq_b     [Q, H, Dn + Dr]   (q_lora, heads, head_dim)
  wkv_a    [D, R + Dr]       (embed, kv_lora)               x -> [latent | k_rope]
  kv_norm  RMSNorm over R (the latent, not k_rope; eps = model.mla.norm_eps)
  wkv_b    [R, H, Dn + Dv]   (kv_lora, heads, head_dim)     latent -> per head [k_nope | v]
  wo       [H, Dv, D]        (heads, head_dim, embed)

RoPE (``apply_rope``, the half-split "rotate_half" layout of the Llama path, with the model's
rope_theta / rope_scaling over Dr features) rotates each head's query rope part and the single
k_rope, which every head shares. ``model.mla.rope_interleave`` (HF DeepSeek's layout, set by
the importer) first regroups the rope features from interleaved pairs (0, 1), (2, 3), ... into
that half-split layout, in queries and keys alike, so HF weights are used as they are. The
latent norms ``q_norm`` / ``kv_norm`` use ``model.mla.norm_eps`` (HF: always 1e-6).

Softmax scale: ``1 / sqrt(Dn + Dr)``, times ``m ** 2`` for yarn scaling with a non-zero
``mscale_all_dim``, ``m = 0.1 * mscale_all_dim * ln(factor) + 1`` (HF's ``yarn_apply_mscale``,
``positions.yarn_softmax_scale``); yarn's cos/sin factor is ``m(mscale) / m(mscale_all_dim)``
as for every yarn model (``positions.rope_frequencies``), 1 for the published DeepSeek configs.

Two forms, one result:
  no cache (training)  the latent is decompressed into per-head k_nope and v; keys are
                       [k_nope | k_rope], and the attention kernel runs as for ``Attention``
                       (packed segments, causal, sliding window, ``index_aligned``).
  cache (prefill and decode)  the cache keeps only ``latent`` [B, S, R] and ``k_rope`` [B, S, Dr]
                       per layer. Absorbed form: each head's q_nope is mapped into the latent
                       space through wkv_b's key half (q_lat = q_nope W_uk, [B, T, H, R]), so
                       scores are ``(q_lat . latent + q_rope . k_rope) * scale``: one attention
                       call with a single shared key [latent | k_rope] (MQA-shaped, Dqk = R + Dr)
                       whose value is the latent itself; the weighted latent [B, T, H, R] then
                       goes through wkv_b's value half and wo. Keys are the old cache plus this
                       call's tokens, masked by positions and segments as in ``Attention``; the
                       cache is never decompressed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.kernels.attention import attention
from tessera.kernels.attention.latent import latent_attention
from tessera.layers.base import cast, normal, param
from tessera.layers.mixers.base import Aux, SeqInfo, decode_keys, write_cache
from tessera.layers.norms import RMSNorm
from tessera.layers.positions import apply_rope, rope_frequencies, yarn_softmax_scale
from tessera.sharding import constrain
from tessera.sharding.rules import FSDP_AXES


@dataclasses.dataclass(frozen=True)
class MLADims:
    """The validated sizes of ``model.mla`` (module docstring names)."""

    heads: int
    q_lora: int
    kv_lora: int
    nope: int
    rope: int
    v: int

    @property
    def qk(self) -> int:
        return self.nope + self.rope


def mla_dims(cfg: ConfigDict) -> MLADims:
    """``model.mla`` checked against the model: a one-line ValueError naming the bad key."""
    m = cfg.mla
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if m[key] <= 0:
            raise ValueError(f"model.mla.{key} must be > 0, got {m[key]}")
    if m.q_lora_rank < 0:
        raise ValueError(f"model.mla.q_lora_rank must be >= 0 (0: no query compression), got "
                         f"{m.q_lora_rank}")
    if m.qk_rope_head_dim % 2:
        raise ValueError(f"model.mla.qk_rope_head_dim must be even (RoPE rotates pairs), got "
                         f"{m.qk_rope_head_dim}")
    if not cfg.rope:
        raise ValueError("model.rope=False: mla needs RoPE (its rope key carries the positions)")
    for key in ("qkv_bias", "qk_norm", "attn_out_bias"):
        if cfg[key]:
            raise ValueError(f"model.{key}=True is not supported by mla")
    return MLADims(cfg.num_heads, m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim,
                   m.qk_rope_head_dim, m.v_head_dim)


class MLA(nnx.Module):
    """[B, T, D] -> [B, T, D]; cache {"latent": [B, S, R], "k_rope": [B, S, Dr]}."""

    # q (after RoPE), the normed latent and rope key, the heads' output; the decompressed keys
    # and values are recomputed from the latent.
    REMAT_SAVED = ("query_proj", "kv_latent", "attn_out")
    # The decompressions' latent rows split like ``embed`` (FSDP): left unsplit, wq_b and wkv_b
    # (3.3B parameters in DeepSeek-V3) were whole on every device.
    LOGICAL_RULES = {"q_lora": (), "kv_lora": (), "lora_rows": FSDP_AXES}
    CAUSAL_SCORES = True

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        dims = self.dims = mla_dims(cfg)
        d, h = cfg.d_model, dims.heads
        self.dtype = jnp.dtype(cfg.dtype)
        self.sliding_window = int(cfg.sliding_window) or None
        self.causal = bool(cfg.causal)
        self.impl = cfg.attention_impl
        self.rope_theta = float(cfg.rope_theta)
        self.rope_scaling = dict(cfg.rope_scaling)
        self.max_seq_len = int(cfg.max_seq_len)
        self.rope_interleave = bool(cfg.mla.rope_interleave)
        self.scale = dims.qk**-0.5 * yarn_softmax_scale(cfg.rope_scaling, int(cfg.max_seq_len))
        init, pd = normal(cfg.init_std), cfg.param_dtype
        if dims.q_lora:
            self.wq = None
            self.wq_a = param(rngs, init, (d, dims.q_lora), ("embed", "q_lora"), pd)
            self.q_norm = RMSNorm(dims.q_lora, eps=cfg.mla.norm_eps, param_dtype=pd, rngs=rngs)
            self.wq_b = param(
                rngs, init, (dims.q_lora, h, dims.qk), ("lora_rows", "heads", "head_dim"), pd
            )
        else:
            self.wq = param(rngs, init, (d, h, dims.qk), ("embed", "heads", "head_dim"), pd)
            self.wq_a = self.q_norm = self.wq_b = None
        self.wkv_a = param(rngs, init, (d, dims.kv_lora + dims.rope), ("embed", "kv_lora"), pd)
        self.kv_norm = RMSNorm(dims.kv_lora, eps=cfg.mla.norm_eps, param_dtype=pd, rngs=rngs)
        self.wkv_b = param(
            rngs, init, (dims.kv_lora, h, dims.nope + dims.v), ("lora_rows", "heads", "head_dim"),
            pd,
        )
        self.wo = param(rngs, init, (h, dims.v, d), ("heads", "head_dim", "embed"), pd)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        inv_freq, factor = rope_frequencies(
            self.dims.rope, theta=self.rope_theta, scaling=self.rope_scaling,
            max_position=self.max_seq_len,
        )
        if self.rope_interleave:  # [..., (Dr/2, 2)] pairs -> [..., (2, Dr/2)] halves
            x = jnp.swapaxes(x.reshape(*x.shape[:-1], -1, 2), -1, -2).reshape(x.shape)
        return apply_rope(x, positions, inv_freq, factor)

    def _query(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (q_nope [B, T, H, Dn], q_rope [B, T, H, Dr] rotated)."""
        if self.wq is not None:
            q = jnp.einsum("btd,dhk->bthk", x, cast(self.wq, self.dtype))
        else:
            c = self.q_norm(jnp.einsum("btd,dr->btr", x, cast(self.wq_a, self.dtype)))
            q = jnp.einsum("btr,rhk->bthk", c, cast(self.wq_b, self.dtype))
        q = jnp.concatenate([q[..., : self.dims.nope], self._rope(q[..., self.dims.nope :],
                                                                 positions)], axis=-1)
        q = checkpoint_name(constrain(q, ("batch", "length", "act_heads", None)), "query_proj")
        return q[..., : self.dims.nope], q[..., self.dims.nope :]

    def _latent(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (normed latent [B, T, R], rotated k_rope [B, T, Dr])."""
        kv = jnp.einsum("btd,dr->btr", x, cast(self.wkv_a, self.dtype))
        latent = self.kv_norm(kv[..., : self.dims.kv_lora])
        k_rope = self._rope(kv[..., None, self.dims.kv_lora :], positions)[:, :, 0]
        names = ("batch", "length", None)
        latent = checkpoint_name(constrain(latent, names), "kv_latent")
        k_rope = checkpoint_name(constrain(k_rope, names), "kv_latent")
        return latent, k_rope

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None
    ) -> tuple[jax.Array, dict | None, Aux]:
        q_nope, q_rope = self._query(x, info.positions)
        latent, k_rope = self._latent(x, info.positions)
        wkv_b = cast(self.wkv_b, self.dtype)
        w_uk, w_uv = wkv_b[..., : self.dims.nope], wkv_b[..., self.dims.nope :]
        if cache is None:
            out = self._decompressed(q_nope, q_rope, latent, k_rope, w_uk, w_uv, info)
            new_cache = None
        else:
            new_cache = {
                "latent": write_cache(cache["latent"], latent, info.write_slots),
                "k_rope": write_cache(cache["k_rope"], k_rope, info.write_slots),
            }
            out = self._absorbed(q_nope, q_rope, latent, k_rope, w_uk, w_uv, info, cache,
                                 new_cache)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_heads", None)), "attn_out")
        y = jnp.einsum("bthv,hvd->btd", out, cast(self.wo, self.dtype))
        return constrain(y, ("batch", "length", "act_embed")), new_cache, {}

    def _decompressed(
        self, q_nope: jax.Array, q_rope: jax.Array, latent: jax.Array, k_rope: jax.Array,
        w_uk: jax.Array, w_uv: jax.Array, info: SeqInfo,
    ) -> jax.Array:
        """Training form: per-head keys [k_nope | k_rope] and values from the latent;
        -> [B, T, H, Dv]."""
        heads = ("batch", "length", "act_heads", None)
        k_nope = jnp.einsum("btr,rhk->bthk", latent, w_uk)
        v = constrain(jnp.einsum("btr,rhk->bthk", latent, w_uv), heads)
        k_rope = jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], self.dims.rope))
        k = constrain(jnp.concatenate([k_nope, k_rope], axis=-1), heads)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        return attention(
            q, k, v, impl=self.impl, q_positions=info.positions, kv_positions=info.positions,
            q_segment_ids=info.segment_ids, kv_segment_ids=info.segment_ids, causal=self.causal,
            sliding_window=self.sliding_window, scale=self.scale,
            # No cache: query i is key i, positions rise (see Attention).
            index_aligned=True,
        )

    def _absorbed(
        self, q_nope: jax.Array, q_rope: jax.Array, latent: jax.Array, k_rope: jax.Array,
        w_uk: jax.Array, w_uv: jax.Array, info: SeqInfo, cache: dict, new_cache: dict,
    ) -> jax.Array:
        """Cached form: attention over [latent | k_rope] of the old cache plus this call's
        tokens, with q_nope absorbed into the latent space; -> [B, T, H, Dv]. A decode step
        (T = 1) attends over the updated cache ``new_cache`` alone (``decode_keys``)."""
        q_lat = jnp.einsum("bthk,rhk->bthr", q_nope, w_uk)
        q = jnp.concatenate([q_lat, q_rope], axis=-1)  # [B, T, H, R + Dr]
        real = (info.segment_ids > 0).astype(jnp.int32)
        if q.shape[1] == 1:
            all_latent = new_cache["latent"].astype(latent.dtype)
            all_rope = new_cache["k_rope"].astype(k_rope.dtype)
            kv_pos, kv_seg = decode_keys(info)
        else:
            all_latent = jnp.concatenate([cache["latent"].astype(latent.dtype), latent], axis=1)
            all_rope = jnp.concatenate([cache["k_rope"].astype(k_rope.dtype), k_rope], axis=1)
            kv_pos = jnp.concatenate([info.cache_positions, info.positions], axis=1)
            old = (info.cache_positions >= 0).astype(jnp.int32)
            kv_seg = jnp.concatenate([old, real], axis=1)
        out_lat = latent_attention(  # keys [latent | rope], one head shared by all queries
            q, all_latent, all_rope, impl=self.impl, q_positions=info.positions,
            kv_positions=kv_pos, q_segment_ids=real, kv_segment_ids=kv_seg,
            causal=self.causal, sliding_window=self.sliding_window, scale=self.scale,
        )  # [B, T, H, R]: the heads' weighted latents
        return jnp.einsum("bthr,rhv->bthv", out_lat, w_uv)

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        """Training form: the (low-rank) query, latent, decompression and output projections,
        then scores over ``seq_len`` keys of Dn + Dr features and values of Dv (the full T x T
        block, as dense attention computes it)."""
        m, h, d = mla_dims(cfg), cfg.num_heads, cfg.d_model
        q = 2 * d * h * m.qk if not m.q_lora else 2 * d * m.q_lora + 2 * m.q_lora * h * m.qk
        kv = 2 * d * (m.kv_lora + m.rope) + 2 * m.kv_lora * h * (m.nope + m.v)
        out = 2 * h * m.v * d
        return q + kv + out + 2 * seq_len * h * (m.qk + m.v)

    @staticmethod
    def init_cache(cfg: ConfigDict, batch: int, length: int, dtype: jnp.dtype) -> dict:
        """The latent [B, S, R] and rope key [B, S, Dr]: R + Dr values per token and layer."""
        m = mla_dims(cfg)
        return {
            "latent": jnp.zeros((batch, length, m.kv_lora), dtype),
            "k_rope": jnp.zeros((batch, length, m.rope), dtype),
        }

    @staticmethod
    def cache_axes() -> dict:
        return {
            "latent": ("cache_batch", "cache_length", "kv_lora"),
            "k_rope": ("cache_batch", "cache_length", "head_dim"),
        }
