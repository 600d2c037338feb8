"""RWKV-7 "Goose": the time mix (``RWKV7``, registered ``"rwkv7"``) and the channel mix
(``RWKV7ChannelMix``, registered ``"rwkv7_cmix"``), with fla's semantics (``fla/layers/rwkv7.py``,
``fla/models/rwkv7/modeling_rwkv7.py``) so fla's HF-layout checkpoints load by renaming and
transposing.

Time mix, x [B, T, D] (already normed), H = D / head_dim heads of K = head_dim channels:
  x_prev = token shift (x one token back, zeros at a document start); each input
  x_c = x + (x_prev - x) * x_c for c in r, w, k, v, a, g (fla's addcmul lerps);
  r = x_r r_proj;  k = x_k k_proj;  v = x_v v_proj
  w = -exp(-1/2) * sigmoid(tanh(x_w w_lora_down) w_lora_up + w_lora_bias)  (log decay, >= -0.61)
  a = sigmoid(x_a a_lora_down a_lora_up + a_lora_bias)      (in-context learning rate)
  g = sigmoid(x_g g_lora_down) g_lora_up                    (output gate)
  value residual: the first layer stores its v as the cross-layer stream "v_first"; every later
    layer mixes v = lerp(v, v_first, sigmoid(x_v v_lora_down v_lora_up + v_lora_bias))
  kk = l2norm(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
  o, S = delta_rule(r, w, k, v, a=-kk, b=kk * a, scale=1)   (tessera.kernels.delta_rule)
  o = groupnorm_per_head(o) * g_norm_weight + g_norm_bias      (eps = head_dim * norm_eps)
  y = ((o + sum_K(r * k * r_k) * v) * g) o_proj                (the "bonus" r.k term)
Channel mix: k = relu(x_k_lerp key)^2, y = k value, x_k_lerp = x + (x_prev - x) * x_k (no
receptance, as fla's RWKV7FeedForward).

Parameters, ours <- fla ``model.layers.{i}.attn.*`` (torch Linear weights are [out, in]: .T):
  x_r, x_w, x_k, x_v, x_a, x_g [D]              <- x_r ... x_g [1, 1, D] flattened
  k_k, k_a [D]                                  <- k_k, k_a
  r_k [H, K]                                    <- r_k
  r_proj, k_proj, v_proj [D, D]                 <- r_proj / k_proj / v_proj.weight.T
  o_proj [D, D]                                 <- o_proj.weight.T
  w_lora_down [D, Rw], w_lora_up [Rw, D]        <- w_lora.lora.0.weight.T, w_lora.lora.2.weight.T
  w_lora_bias [D]                               <- w_lora.lora.2.bias
  a_lora_down/up/bias (Ra)                      <- a_lora.lora.{0,2}.weight.T, a_lora.lora.2.bias
  v_lora_down/up/bias (Rv)                      <- v_lora.lora.{0,2}.weight.T, v_lora.lora.2.bias
  g_lora_down [D, Rg], g_lora_up [Rg, D]        <- g_lora.lora.0.weight.T, g_lora.lora.2.weight.T
  g_norm_weight, g_norm_bias [D]                <- g_norm.weight, g_norm.bias
channel mix, ours <- ``model.layers.{i}.ffn.*``: x_k [D] <- x_k; key [D, F] <- key.weight.T;
value [F, D] <- value.weight.T. The block: norm1 <- attn_norm, norm2 <- ffn_norm (LayerNorm
weight -> scale, bias -> bias); the LM: embed_norm <- model.layers.0.pre_norm (ln0),
final_norm <- model.norm, embed.embedding <- model.embeddings.weight, head <- lm_head.weight.T.

Layer 0: fla's first layer has no v_lora (it stores v_first instead). Our mixer always creates
the v_lora parameters (the scanned layers must all have the same parameters, and a layer learns
it is the first only at call time, from the streams); the first layer, a prefix block in the
RWKV-7 configs, leaves them unused (zero gradients). The importer sets them to zero
(`Rule(absent=...)` in convert/families/rwkv.py) and export leaves them out.

Initialisation follows fla's ``_initialize_weights`` with the depth-dependent ratios fixed at
mid-depth (ratio_0_to_1 = ratio_1_to_almost0 = 1/2): a mixer is built without its layer index
(the scanned layers are built by one vmapped constructor). o_proj and the channel mix's value
start at zero, as fla's (before its HF post-init rescale) and the official RWKV-7's.

Packed rows and padding: a document starts at position 0 or (without a cache) where the segment
id changes; there the token shift reads zeros and the WKV state is reset before the token.
Padding (segment id 0) has its input zeroed and w = k = v = kk = 0, so it never moves the state,
and the shift cache keeps x at each row's last real token.

Cache: {"shift": [B, D] (the cache dtype), "wkv": [B, H, K, K] float32} for the time mix,
{"shift": [B, D]} for the channel mix; constant size. Prefill runs the chunked form, single
tokens the sequential step (the op's auto dispatch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.kernels.delta_rule import delta_rule
from tessera.kernels.delta_rule.reference import DEFAULT_CHUNK, chunked_flops_per_token
from tessera.layers.base import Initializer, cast, param, zeros
from tessera.layers.mixers.base import Aux, SeqInfo
from tessera.layers.mixers.recurrent import (
    SHIFT_RULES,
    TokenShiftCache,
    document_starts,
    token_shift,
)
from tessera.layers.norms import head_group_norm
from tessera.sharding import constrain
from tessera.sharding.rules import FSDP_AXES

F32 = jnp.float32
LOG_DECAY_SCALE = math.exp(-0.5)  # w = -exp(-1/2) * sigmoid(.): RWKV-7's decay bound
MID_DEPTH = 0.5  # fla's depth ratios at init, fixed (module docstring)


def lora_ranks(cfg: ConfigDict) -> dict[str, int]:
    """Ranks of the decay / a / v / gate LoRAs: ``model.rwkv7.*_low_rank_dim``, where 0 takes the
    official RWKV-7 suggestion for width D: max(32, round(c * D**p / 32) * 32) with (c, p) =
    (1.8, 1/2) for decay and a, (1.3, 1/2) for v, (0.6, 0.8) for the gate."""
    d, r = cfg.d_model, cfg.rwkv7

    def rank(given: int, c: float, p: float) -> int:
        return int(given) or max(32, int(round(c * d**p / 32) * 32))

    return {
        "w": rank(r.decay_low_rank_dim, 1.8, 0.5),
        "a": rank(r.a_low_rank_dim, 1.8, 0.5),
        "v": rank(r.v_low_rank_dim, 1.3, 0.5),
        "g": rank(r.gate_low_rank_dim, 0.6, 0.8),
    }


def _constant(values: jax.Array) -> Initializer:
    return lambda key, shape, dtype: jnp.broadcast_to(values, tuple(shape)).astype(dtype)


def _orthogonal(gain: float) -> Initializer:
    return jax.nn.initializers.orthogonal(scale=gain)


def _lerp_init(d: int, power: float) -> Initializer:
    """fla's token-shift mix: 1 - (n / D) ** power over the channels n."""
    return _constant(1.0 - (jnp.arange(d, dtype=F32) / d) ** power)


def _dense(x: jax.Array, w: nnx.Param, dtype: jnp.dtype) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, cast(w, dtype))


class RWKV7(nnx.Module):
    """[B, T, D] -> [B, T, D]; ``STREAMS = ("v_first",)``; cache {"shift", "wkv"}."""

    STREAMS = ("v_first",)
    REMAT_SAVED = ("rwkv7_wkv", "rwkv7_out")
    LOGICAL_RULES = {
        "rwkv_inner": ("tensor",),
        "rwkv_inner_fsdp": ("tensor", *FSDP_AXES),  # the LoRA up-projections' (no embed)
        "rwkv_heads": ("tensor",),
        "lora_rank": (),
        **SHIFT_RULES,
        "cache_rwkv_heads": ("tensor",),
    }

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        d, hd = cfg.d_model, cfg.head_dim
        if d % hd:
            raise ValueError(f"model: d_model={d} is not a multiple of head_dim={hd} (rwkv7)")
        self.d_model, self.head_dim, self.num_heads = d, hd, d // hd
        self.eps = float(cfg.norm_eps) * hd  # fla's GroupNorm eps = head_dim * norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl, self.chunk_size = cfg.rwkv7.impl, int(cfg.rwkv7.chunk_size) or None
        ranks = lora_ranks(cfg)
        pd = cfg.param_dtype
        n = jnp.arange(d, dtype=F32)
        linear = n / (d - 1) - 0.5
        zigzag = ((n % hd) - (hd - 1) / 2) / ((hd - 1) / 2)
        zigzag = zigzag * jnp.abs(zigzag)
        www = -6 + 6 * (n / (d - 1)) ** (1 + MID_DEPTH**0.3)

        def vec(init: Initializer) -> nnx.Param:
            return param(rngs, init, (d,), ("embed",), pd)

        for name, power in (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2)):
            setattr(self, f"x_{name}", vec(_lerp_init(d, power * MID_DEPTH)))
        self.k_k = param(rngs, _constant(0.71 - linear * 0.1), (d,), ("rwkv_inner",), pd)
        self.k_a = param(rngs, _constant(jnp.float32(1.02)), (d,), ("rwkv_inner",), pd)
        self.r_k = param(
            rngs,
            _constant(jnp.float32(-0.04)),
            (self.num_heads, hd),
            ("rwkv_heads", "head_dim"),
            pd,
        )
        self.r_proj = param(rngs, _orthogonal(1.0), (d, d), ("embed", "rwkv_inner"), pd)
        self.k_proj = param(rngs, _orthogonal(0.1), (d, d), ("embed", "rwkv_inner"), pd)
        self.v_proj = param(rngs, _orthogonal(1.0), (d, d), ("embed", "rwkv_inner"), pd)
        self.o_proj = param(rngs, zeros, (d, d), ("rwkv_inner", "embed"), pd)
        biases = {
            "w": www + 0.5 + zigzag * 2.5,
            "a": -0.19 + zigzag * 0.3 + linear * 0.4,
            "v": 0.73 - linear * 0.4,
            "g": None,
        }
        for name, bias in biases.items():
            rank = ranks[name]
            gain = 0.1 * (math.sqrt(rank / d) if rank > d else 1.0)
            setattr(
                self, f"{name}_lora_down", param(rngs, zeros, (d, rank), ("embed", "lora_rank"), pd)
            )
            setattr(
                self,
                f"{name}_lora_up",
                param(rngs, _orthogonal(gain), (rank, d), ("lora_rank", "rwkv_inner_fsdp"), pd),
            )
            if bias is not None:
                setattr(
                    self,
                    f"{name}_lora_bias",
                    param(rngs, _constant(bias), (d,), ("rwkv_inner",), pd),
                )
        self.g_norm_weight = param(
            rngs, _constant(jnp.float32(MID_DEPTH**0.7)), (d,), ("rwkv_inner",), pd
        )
        self.g_norm_bias = param(rngs, zeros, (d,), ("rwkv_inner",), pd)

    def _lora(
        self, name: str, x: jax.Array, inner: Callable[[jax.Array], jax.Array] | None
    ) -> jax.Array:
        """(inner(x down)) up (+ bias), float32 result."""
        h = _dense(x, getattr(self, f"{name}_lora_down"), self.dtype)
        if inner is not None:
            h = inner(h)
        y = _dense(h, getattr(self, f"{name}_lora_up"), self.dtype).astype(F32)
        bias = getattr(self, f"{name}_lora_bias", None)
        return y if bias is None else y + bias[...].astype(F32)

    def _heads(self, a: jax.Array) -> jax.Array:
        return a.reshape(*a.shape[:2], self.num_heads, self.head_dim)

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None, streams: dict | None = None
    ) -> tuple[jax.Array, dict | None, Aux, dict]:
        streams = {} if streams is None else dict(streams)
        b, t, d = x.shape
        cached = cache is not None
        real = info.segment_ids > 0
        x = jnp.where(real[..., None], x, 0).astype(self.dtype)
        x_prev, last = token_shift(x, info, cache["shift"] if cached else None, cached)
        delta = x_prev - x
        xr, xw, xk, xv, xa, xg = (
            x + delta * cast(getattr(self, f"x_{c}"), self.dtype) for c in "rwkvag"
        )
        r = _dense(xr, self.r_proj, self.dtype)
        k = _dense(xk, self.k_proj, self.dtype)
        v = _dense(xv, self.v_proj, self.dtype)
        w = -LOG_DECAY_SCALE * jax.nn.sigmoid(self._lora("w", xw, jnp.tanh))
        if "v_first" in streams:
            mix = jax.nn.sigmoid(self._lora("v", xv, None))
            v_first = streams["v_first"].astype(F32)
            v = (v.astype(F32) + (v_first - v.astype(F32)) * mix).astype(self.dtype)
        else:
            streams["v_first"] = v
        a = jax.nn.sigmoid(self._lora("a", xa, None))
        g = self._lora("g", xg, jax.nn.sigmoid)

        kf = k.astype(F32)
        kk = self._heads(kf * self.k_k[...].astype(F32))
        kk = kk * jax.lax.rsqrt(jnp.maximum(jnp.sum(kk * kk, -1, keepdims=True), 1e-24))
        kf = kf * (1.0 + (a - 1.0) * self.k_a[...].astype(F32))
        keep = real[..., None, None]
        r, w, kh, a = (self._heads(z) for z in (r, w, kf, a))
        vh = jnp.where(keep, self._heads(v), 0)
        w, kh, kk = (jnp.where(keep, z, 0.0) for z in (w, kh, kk))
        act = ("batch", "length", "act_heads", None)
        r, w, kh, vh, kk, a = (constrain(z, act) for z in (r, w, kh, vh, kk, a))
        o, state = delta_rule(
            r,
            w,
            kh,
            vh,
            -kk,
            kk * a,
            h0=cache["wkv"] if cached else None,
            reset=document_starts(info, cached),
            scale=1.0,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        o = checkpoint_name(constrain(o, act), "rwkv7_wkv").astype(F32)

        o = head_group_norm(o, self.g_norm_weight[...], self.g_norm_bias[...], self.eps)
        bonus = jnp.sum(r.astype(F32) * kh * self.r_k[...].astype(F32), -1, keepdims=True)
        o = (o + (bonus * vh.astype(F32)).reshape(b, t, d)) * g
        out = _dense(o.astype(self.dtype), self.o_proj, self.dtype)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_embed")), "rwkv7_out")
        new_cache = None
        if cached:
            new_cache = {"shift": last.astype(cache["shift"].dtype), "wkv": state}
        return out, new_cache, {}, streams

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        """The r/k/v/o projections, the four LoRAs and the chunked delta rule as executed
        (``kernels.delta_rule.reference.chunked_flops_per_token`` per head, chunks of
        min(chunk_size, seq_len) tokens)."""
        d, hd = cfg.d_model, cfg.head_dim
        lora = sum(2 * 2 * d * r for r in lora_ranks(cfg).values())
        chunk = min(int(cfg.rwkv7.chunk_size) or DEFAULT_CHUNK, max(seq_len, 1))
        wkv = (d // hd) * chunked_flops_per_token(chunk, hd, hd)
        return 4 * 2 * d * d + lora + wkv

    @staticmethod
    def init_cache(cfg: ConfigDict, batch: int, length: int, dtype: jnp.dtype) -> dict:
        """The same size for any ``length``: shift [B, D] (``dtype``, x at the last token) and
        wkv [B, H, K, K] (float32)."""
        d, hd = cfg.d_model, cfg.head_dim
        return {
            **TokenShiftCache.init_cache(cfg, batch, length, dtype),
            "wkv": jnp.zeros((batch, d // hd, hd, hd), F32),
        }

    @staticmethod
    def cache_axes() -> dict:
        return {
            **TokenShiftCache.cache_axes(),
            "wkv": ("cache_batch", "cache_rwkv_heads", "head_dim", None),
        }


class RWKV7ChannelMix(TokenShiftCache, nnx.Module):
    """RWKV-7's channel mix: [B, T, D] -> [B, T, D] through relu(.)^2 of width ``mlp_dim``;
    called as ``(x, info, cache) -> (y, aux, cache)`` (cache {"shift": [B, D]} or None)."""

    REMAT_SAVED = ("rwkv7_cmix_out",)
    LOGICAL_RULES = SHIFT_RULES

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
        self.dtype = jnp.dtype(cfg.dtype)
        self.x_k = param(rngs, _lerp_init(d, MID_DEPTH**4), (d,), ("embed",), pd)
        self.key = param(rngs, _orthogonal(1.0), (d, f), ("embed", "mlp"), pd)
        self.value = param(rngs, zeros, (f, d), ("mlp", "embed"), pd)

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None
    ) -> tuple[jax.Array, Aux, dict | None]:
        cached = cache is not None
        x = jnp.where((info.segment_ids > 0)[..., None], x, 0).astype(self.dtype)
        x_prev, last = token_shift(x, info, cache["shift"] if cached else None, cached)
        xk = x + (x_prev - x) * cast(self.x_k, self.dtype)
        h = jnp.square(jax.nn.relu(_dense(xk, self.key, self.dtype)))
        h = constrain(h, ("batch", "length", "act_mlp"))
        out = _dense(h, self.value, self.dtype)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_embed")), "rwkv7_cmix_out")
        new_cache = {"shift": last.astype(cache["shift"].dtype)} if cached else None
        return out, {}, new_cache

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        del seq_len
        return 2 * 2 * cfg.d_model * cfg.mlp_dim
