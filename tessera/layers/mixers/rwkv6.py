"""RWKV-6 "Finch" time mix (sequence mixer ``rwkv6``) and channel mix (``rwkv6_cmix``).

Semantics follow flash-linear-attention's ``layers/rwkv6.py`` (``RWKV6Attention``) and
``models/rwkv6/modeling_rwkv6.py`` (``RWKV6FeedForward``). Sizes: key_dim Kd = expand_k * D,
value_dim Vd = expand_v * D, H = Vd / head_dim heads of K = Kd / H key and V = head_dim value
channels; R = proj_low_rank_dim, Rw = gate_low_rank_dim, F = mlp_dim.

Time mix, per token with x_prev the previous token's input (token shift) and delta = x_prev - x:
  m_{r,w,k,v,g} = x_bias + tanh((x + delta * x_mu) x_proj_a)_{5 blocks of R} x_proj_b
  x_c = x + delta * m_c                                    (data-dependent lerp, c in r w k v g)
  r, k, v, gate = x_r r_proj, x_k k_proj, x_v v_proj, x_g g_proj
  log decay     = -exp(w_bias + tanh(x_w w_lora_a) w_lora_b)            (float32, per channel)
  o = WKV(r, k, v, log decay, bonus)   (`tessera.kernels.gla` with u = bonus, scale 1)
  y = (GroupNorm_H(o) * g_norm_weight + g_norm_bias) * silu(gate)  o_proj
Channel mix: k = relu((x + delta * key_mu) key)^2; y = sigmoid((x + delta * receptance_mu)
receptance) * (k value).

Parameters, stored [in, out] (ours <- fla's ``model.layers.{i}.attn.*`` / ``.ffn.*``):
  x_mu [D]               <- attn.x_proj.0.mu
  x_proj_a [D, 5R]       <- attn.x_proj.0.linear.weight.T
  x_proj_b [5, R, D]     <- attn.x_proj.2.weight.view(D, 5, R).permute(1, 2, 0)
  x_bias [5, D]          <- attn.x_bias                  (rows in fla's order r, w, k, v, g)
  r_proj, k_proj [D, Kd], v_proj, g_proj [D, Vd]  <- attn.{r,k,v,g}_proj.linear.weight.T
  w_lora_a [D, Rw]       <- attn.w_proj.linear.lora.0.weight.T
  w_lora_b [Rw, Kd]      <- attn.w_proj.linear.lora.2.weight.T
  w_bias [Kd]            <- attn.w_proj.linear.lora.2.bias
  bonus [H, K]           <- attn.bonus
  g_norm_weight, g_norm_bias [Vd]  <- attn.g_norm.weight, attn.g_norm.bias
  o_proj [Vd, D]         <- attn.o_proj.weight.T
  key_mu, receptance_mu [D]  <- ffn.key.mu, ffn.receptance.mu
  key [D, F], receptance [D, D], value [F, D]  <- ffn.{key,receptance}.linear.weight.T,
                                                  ffn.value.weight.T
(BlinkDL's checkpoints name these time_maa_x, time_maa_w1, time_maa_w2, time_maa_{r,w,k,v,g},
receptance, time_decay_w1/w2, time_decay, time_faaaa, ln_x, output; their GroupNorm runs on
o / 8 with eps 64e-5, i.e. eps 0.04096 on o: set model.rwkv6.group_norm_eps accordingly.)

Packed rows and caches: the token shift never reaches across a document start (zeros there,
``recurrent.token_shift``), the WKV state resets before each document's first token, and padding
(segment id 0) has k = v = 0 and log decay 0, so it never moves the state; the shift caches keep
each row's last real token. Caches (constant size for any length): time mix {"shift": [B, D]
(compute dtype), "wkv": [B, H, K, V] float32}, channel mix {"shift": [B, D]}. Prefill runs the
chunked WKV, one-token decode the sequential step (``impl="auto"``).

Init: BlinkDL's ratio-based RWKV-6 init (time_maa_* = 1 - (n / D)^p, decay speeds
-6 + 5 (n / (Kd - 1))^(0.7 + 1.3 ratio), a bonus ramp with a zigzag, zero first LoRA factors and
U(-0.01, 0.01) second ones), taken at mid depth (ratio 0.5): the scanned stack builds every layer
with the same initialiser, so the depth ramp is not reproduced. Projections use
N(0, init_std) like the rest of tessera.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.kernels.gla import gla
from tessera.layers.base import Initializer, cast, normal, ones, param, zeros
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
RATIO = 0.5  # the layer-depth ratio the init is taken at (module docstring)


def _sizes(cfg: ConfigDict) -> tuple[int, int, int, int]:
    """(key_dim, value_dim, heads, key channels per head), checked."""
    s, d = cfg.rwkv6, cfg.d_model
    kd, vd = round(s.expand_k * d), round(s.expand_v * d)
    if vd % s.head_dim:
        raise ValueError(
            f"model.rwkv6: value_dim = expand_v * d_model = {vd} is not a multiple of "
            f"head_dim={s.head_dim}"
        )
    h = vd // s.head_dim
    if kd % h:
        raise ValueError(
            f"model.rwkv6: key_dim = expand_k * d_model = {kd} is not a multiple of the "
            f"{h} heads"
        )
    return kd, vd, h, kd // h


def _ramp(fn: Callable[[jax.Array], jax.Array]) -> Initializer:
    """An initialiser ``fn(n / size)`` of the channel index along the last axis."""

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
        del key
        n = shape[-1]
        return jnp.broadcast_to(fn(jnp.arange(n, dtype=F32) / n), tuple(shape)).astype(dtype)

    return init


def _maa(power: float, shift: float = 0.0) -> Initializer:
    """BlinkDL's time_maa_*: 1 - ((n / D)^power + shift)."""
    return _ramp(lambda f: 1.0 - (f**power + shift))


def _mix_bias_init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    """x_bias [5, D], rows r, w, k, v, g (fla's order) as BlinkDL's time_maa_{r,w,k,v,g}."""
    late = 1.0 - RATIO  # ratio_1_to_almost0
    rows = (_maa(0.5 * late), _maa(late), _maa(late), _maa(late, 0.3 * RATIO), _maa(0.5 * late))
    return jnp.stack([f(key, shape[1:], dtype) for f in rows])


def _decay_init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    """w_bias [Kd]: -6 + 5 (n / (Kd - 1))^(0.7 + 1.3 ratio), slow to fast decays."""
    del key
    f = jnp.arange(shape[0], dtype=F32) / max(shape[0] - 1, 1)
    return (-6.0 + 5.0 * f ** (0.7 + 1.3 * RATIO)).astype(dtype)


def _bonus_init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    """bonus [H, K]: ratio (1 - n / (Kd - 1)) + zigzag 0.1 ((n + 1) % 3 - 1) over n < Kd."""
    del key
    n = jnp.arange(shape[0] * shape[1], dtype=F32)
    u = RATIO * (1.0 - n / max(n.shape[0] - 1, 1)) + ((n + 1) % 3 - 1) * 0.1
    return u.reshape(shape).astype(dtype)


def _uniform(bound: float) -> Initializer:
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _lerp(x: jax.Array, delta: jax.Array, mu: jax.Array) -> jax.Array:
    return x + delta * mu


class RWKV6(nnx.Module):
    """[B, T, D] -> [B, T, D]; cache {"shift": [B, D], "wkv": [B, H, K, V] float32}."""

    REMAT_SAVED = ("rwkv_in", "rwkv_out")
    # Key / value channels are head-major (head h holds channels h K .. h K + K - 1), so
    # splitting them over tensor splits whole heads when tensor divides H.
    LOGICAL_RULES = {
        "rwkv_key": ("tensor",),
        "rwkv_key_fsdp": ("tensor", *FSDP_AXES),  # w_lora_b's (no embed dimension)
        "rwkv_value": ("tensor",),
        "rwkv_heads": ("tensor",),
        "rwkv_mix": (),
        "rwkv_lora": (),
        **SHIFT_RULES,
        "cache_rwkv_heads": ("tensor",),
    }

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        s, d = cfg.rwkv6, cfg.d_model
        kd, vd, h, dk = _sizes(cfg)
        self.num_heads, self.head_k, self.head_v = h, dk, vd // h
        self.mix_rank, self.eps = s.proj_low_rank_dim, float(s.group_norm_eps)
        self.chunk_size, self.impl = s.chunk_size, s.impl
        self.dtype = jnp.dtype(cfg.dtype)
        pd, init = cfg.param_dtype, normal(cfg.init_std)
        r, rw = s.proj_low_rank_dim, s.gate_low_rank_dim
        self.x_mu = param(rngs, _maa(1.0 - RATIO), (d,), ("embed",), pd)
        self.x_proj_a = param(rngs, zeros, (d, 5 * r), ("embed", "rwkv_lora"), pd)
        self.x_proj_b = param(
            rngs, _uniform(0.01), (5, r, d), ("rwkv_mix", "rwkv_lora", "embed"), pd
        )
        self.x_bias = param(rngs, _mix_bias_init, (5, d), ("rwkv_mix", "embed"), pd)
        self.r_proj = param(rngs, init, (d, kd), ("embed", "rwkv_key"), pd)
        self.k_proj = param(rngs, init, (d, kd), ("embed", "rwkv_key"), pd)
        self.v_proj = param(rngs, init, (d, vd), ("embed", "rwkv_value"), pd)
        self.g_proj = param(rngs, init, (d, vd), ("embed", "rwkv_value"), pd)
        self.w_lora_a = param(rngs, zeros, (d, rw), ("embed", "rwkv_lora"), pd)
        self.w_lora_b = param(rngs, _uniform(0.01), (rw, kd), ("rwkv_lora", "rwkv_key_fsdp"), pd)
        self.w_bias = param(rngs, _decay_init, (kd,), ("rwkv_key",), pd)
        self.bonus = param(rngs, _bonus_init, (h, dk), ("rwkv_heads", "head_dim"), pd)
        self.g_norm_weight = param(rngs, ones, (vd,), ("rwkv_value",), pd)
        self.g_norm_bias = param(rngs, zeros, (vd,), ("rwkv_value",), pd)
        self.o_proj = param(rngs, init, (vd, d), ("rwkv_value", "embed"), pd)

    def _dense(self, x: jax.Array, w: nnx.Param) -> jax.Array:
        return jnp.einsum("bti,io->bto", x, cast(w, self.dtype))

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None
    ) -> tuple[jax.Array, dict | None, Aux]:
        b, t, d = x.shape
        h, dk, dv = self.num_heads, self.head_k, self.head_v
        cached = cache is not None
        x_prev, last = token_shift(x, info, None if cache is None else cache["shift"], cached)
        delta = x_prev - x
        mix = jnp.tanh(self._dense(_lerp(x, delta, cast(self.x_mu, self.dtype)), self.x_proj_a))
        mix = jnp.einsum(
            "btnr,nrd->btnd", mix.reshape(b, t, 5, self.mix_rank), cast(self.x_proj_b, self.dtype)
        )
        mix = mix + cast(self.x_bias, self.dtype)
        x_r, x_w, x_k, x_v, x_g = (_lerp(x, delta, mix[:, :, i]) for i in range(5))
        r, k = self._dense(x_r, self.r_proj), self._dense(x_k, self.k_proj)
        v, gate = self._dense(x_v, self.v_proj), self._dense(x_g, self.g_proj)
        w = jnp.tanh(self._dense(x_w, self.w_lora_a))
        w = jnp.einsum("btr,rk->btk", w.astype(F32), self.w_lora_b[...].astype(F32))
        r, k, v, w = (checkpoint_name(a, "rwkv_in") for a in (r, k, v, w))

        real = (info.segment_ids > 0)[..., None]
        log_decay = jnp.where(real, -jnp.exp(w + self.w_bias[...].astype(F32)), 0.0)
        heads = ("batch", "length", "act_heads", None)
        r = constrain(r.reshape(b, t, h, dk), heads)
        k = constrain(jnp.where(real, k, 0).reshape(b, t, h, dk), heads)
        v = constrain(jnp.where(real, v, 0).astype(F32).reshape(b, t, h, dv), heads)
        o, state = gla(
            r,
            k,
            v,
            log_decay.reshape(b, t, h, dk),
            u=self.bonus[...].astype(F32),
            h0=None if cache is None else cache["wkv"],
            reset=document_starts(info, cached),
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        o = constrain(o, heads)
        o = head_group_norm(o, self.g_norm_weight[...], self.g_norm_bias[...], self.eps)
        o = (o * jax.nn.silu(gate.astype(F32))).astype(self.dtype)
        out = constrain(self._dense(o, self.o_proj), ("batch", "length", "act_embed"))
        out = checkpoint_name(out, "rwkv_out")
        if cache is None:
            return out, None, {}
        return out, {"shift": last.astype(cache["shift"].dtype), "wkv": state}, {}

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        """Projections (mix LoRA, r k v g, decay LoRA, output) and the chunked WKV: within a chunk
        of L = min(chunk_size, seq_len) tokens the r.k scores and the weighted sum of values over
        the whole L x L block (as executed), plus writing the chunk state and reading the
        incoming one."""
        s, d = cfg.rwkv6, cfg.d_model
        kd, vd, h, dk = _sizes(cfg)
        r, rw = s.proj_low_rank_dim, s.gate_low_rank_dim
        proj = 2 * (2 * d * 5 * r + 2 * d * kd + 2 * d * vd + d * rw + rw * kd + vd * d)
        chunk = min(s.chunk_size, seq_len)
        return proj + 2 * chunk * (kd + vd) + 2 * 2 * kd * (vd // h)

    @staticmethod
    def init_cache(cfg: ConfigDict, batch: int, length: int, dtype: jnp.dtype) -> dict:
        """The same size for any ``length``: shift [B, D] (``dtype``: the last token's input)
        and wkv [B, H, K, V] float32."""
        _, vd, h, dk = _sizes(cfg)
        return {
            **TokenShiftCache.init_cache(cfg, batch, length, dtype),
            "wkv": jnp.zeros((batch, h, dk, vd // h), F32),
        }

    @staticmethod
    def cache_axes() -> dict:
        return {
            **TokenShiftCache.cache_axes(),
            "wkv": ("cache_batch", "cache_rwkv_heads", "head_dim", "head_dim"),
        }


class RWKV6ChannelMix(TokenShiftCache, nnx.Module):
    """[B, T, D] -> [B, T, D] through relu^2 keys of width ``cfg.mlp_dim``, gated by a sigmoid
    receptance; stateful (the token shift): cache {"shift": [B, D]}."""

    REMAT_SAVED = ("rwkv_cmix_out",)
    LOGICAL_RULES = {"rwkv_receptance": ("tensor",), **SHIFT_RULES}

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
        self.dtype = jnp.dtype(cfg.dtype)
        init = normal(cfg.init_std)
        self.key_mu = param(rngs, _maa(1.0 - RATIO), (d,), ("embed",), pd)
        self.receptance_mu = param(rngs, _maa(1.0 - RATIO), (d,), ("embed",), pd)
        self.key = param(rngs, init, (d, f), ("embed", "mlp"), pd)
        self.value = param(rngs, init, (f, d), ("mlp", "embed"), pd)
        self.receptance = param(rngs, init, (d, d), ("embed", "rwkv_receptance"), pd)

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None
    ) -> tuple[jax.Array, Aux, dict | None]:
        cached = cache is not None
        x_prev, last = token_shift(x, info, None if cache is None else cache["shift"], cached)
        delta = x_prev - x
        dense = lambda a, w: jnp.einsum("bti,io->bto", a, cast(w, self.dtype))
        key = dense(_lerp(x, delta, cast(self.key_mu, self.dtype)), self.key)
        key = constrain(jnp.square(jax.nn.relu(key)), ("batch", "length", "act_mlp"))
        receptance = dense(_lerp(x, delta, cast(self.receptance_mu, self.dtype)), self.receptance)
        out = jax.nn.sigmoid(receptance) * dense(key, self.value)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_embed")), "rwkv_cmix_out")
        return out, {}, None if cache is None else {"shift": last.astype(cache["shift"].dtype)}

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        """Key, value and receptance projections."""
        del seq_len
        return 2 * (2 * cfg.d_model * cfg.mlp_dim + cfg.d_model * cfg.d_model)

