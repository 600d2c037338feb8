"""Mamba-2 sequence mixer: in-projection, causal depthwise conv, SSD, gated RMSNorm, out-projection.

Semantics follow Hugging Face ``Mamba2Mixer.torch_forward`` so ``Mamba2ForCausalLM`` weights load
by renaming and transposing. Sizes: d_inner = expand * d_model, H = d_inner / head_dim heads of
P = head_dim channels, G groups of B/C with N = state_dim, K = conv_width,
conv channels Cc = d_inner + 2 G N.

Parameters (ours <- HF ``backbone.layers.{i}.mixer.*``):
  in_proj        [d_model, 2 d_inner + 2 G N + H]  <- in_proj.weight.T; output order z | xBC | dt
                 (HF's split also has two d_mlp pieces in front, 0 wide in every Mamba-2 config)
  in_proj_bias   [2 d_inner + 2 G N + H]           <- in_proj.bias       (model.ssm.bias only)
  conv1d_weight  [K, Cc]                           <- conv1d.weight[:, 0, :].T  (torch [Cc, 1, K])
  conv1d_bias    [Cc]                              <- conv1d.bias        (model.ssm.conv_bias only)
  dt_bias, A_log, D  [H]                           <- dt_bias, A_log, D
  norm_weight    [d_inner]                         <- norm.weight
  out_proj       [d_inner, d_model]                <- out_proj.weight.T
  out_proj_bias  [d_model]                         <- out_proj.bias      (model.ssm.bias only)
conv1d_weight[k] multiplies the input k - (K - 1) steps away (k = K - 1: the current token), as
torch's Conv1d with padding K - 1 truncated to the first T outputs does.

Gated norm: y = rmsnorm(y * silu(z)) * norm_weight with the mean of squares taken per group of
d_inner / G contiguous channels, as mamba_ssm's ``RMSNormGated(group_size=d_inner // ngroups)``
and HF's Bamba / Zamba2 / NemotronH ``MambaRMSNormGated(group_size=...)`` do. HF's
``Mamba2Mixer`` itself normalises over all d_inner channels; the two agree for G = 1, which every
state-spaces/mamba2 checkpoint uses (not Mamba-Codestral, G = 8). eps = model.norm_eps.

Packed rows: a document starts where ``positions == 0`` or (without a cache) the segment id
changes; there the SSM state is reset and the conv does not reach back. Padding (segment id 0)
has its conv input zeroed, dt = 0 and x = 0, so it never moves the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.kernels.ssd import ssd
from tessera.layers.base import cast, normal, ones, param, zeros
from tessera.layers.mixers.base import Aux, SeqInfo
from tessera.layers.mixers.recurrent import (
    a_log_init,
    causal_conv,
    dt_bias_init,
    history,
    tail,
    tokens_since_start,
    uniform,
)
from tessera.sharding import constrain
from tessera.sharding.rules import FSDP_AXES

F32 = jnp.float32


class Mamba2(nnx.Module):
    """[B, T, D] -> [B, T, D]; cache {"conv": [B, K-1, Cc], "ssm": [B, H, P, N] float32}."""

    REMAT_SAVED = ("ssm_in", "ssm_out")
    # The fused in-projection output (z | xBC | dt) and the conv channels (x | B | C) mix pieces
    # of different kinds, so they are not split over tensor.
    LOGICAL_RULES = {
        "ssm_proj": (),
        "ssm_conv": (),
        "ssm_conv_weight": FSDP_AXES,  # the conv kernel's channels: FSDP only
        "conv_width": (),
        "ssm_inner": ("tensor",),
        "ssm_heads": ("tensor",),
        "ssm_state": (),
        "cache_ssm_heads": ("tensor",),
    }

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        s = cfg.ssm
        d = cfg.d_model
        self.d_inner = int(s.expand * d)
        if self.d_inner % s.head_dim:
            raise ValueError(
                f"model.ssm: d_inner = expand * d_model = {self.d_inner} is not a multiple of "
                f"head_dim={s.head_dim}"
            )
        self.num_heads = self.d_inner // s.head_dim
        if self.num_heads % s.num_groups:
            raise ValueError(
                f"model.ssm: num_heads={self.num_heads} is not a multiple of "
                f"num_groups={s.num_groups}"
            )
        self.head_dim, self.num_groups, self.state_dim = s.head_dim, s.num_groups, s.state_dim
        self.conv_width, self.chunk_size, self.impl = s.conv_width, s.chunk_size, s.impl
        self.dt_limit = (float(s.dt_limit_min), float(s.dt_limit_max))
        self.eps = float(cfg.norm_eps)
        self.dtype = jnp.dtype(cfg.dtype)
        gn = self.num_groups * self.state_dim
        self.conv_channels = self.d_inner + 2 * gn
        proj = self.d_inner + self.conv_channels + self.num_heads
        h, pd = self.num_heads, cfg.param_dtype
        init = normal(cfg.init_std)
        self.in_proj = param(rngs, init, (d, proj), ("embed", "ssm_proj"), pd)
        self.in_proj_bias = param(rngs, zeros, (proj,), ("ssm_proj",), pd) if s.bias else None
        self.conv1d_weight = param(
            rngs,
            uniform(s.conv_width**-0.5),
            (s.conv_width, self.conv_channels),
            ("conv_width", "ssm_conv_weight"),
            pd,
        )
        self.conv1d_bias = (
            param(rngs, zeros, (self.conv_channels,), ("ssm_conv",), pd) if s.conv_bias else None
        )
        self.dt_bias = param(
            rngs, dt_bias_init(s.dt_min, s.dt_max, s.dt_init_floor), (h,), ("ssm_heads",), pd
        )
        self.A_log = param(rngs, a_log_init, (h,), ("ssm_heads",), pd)
        self.D = param(rngs, ones, (h,), ("ssm_heads",), pd)
        self.norm_weight = param(rngs, ones, (self.d_inner,), ("ssm_inner",), pd)
        self.out_proj = param(rngs, init, (self.d_inner, d), ("ssm_inner", "embed"), pd)
        self.out_proj_bias = param(rngs, zeros, (d,), ("embed",), pd) if s.bias else None

    def _conv(self, hist: jax.Array, since_start: jax.Array) -> jax.Array:
        """silu(causal depthwise conv) [B, T, Cc] in the compute dtype (``recurrent.causal_conv``:
        float32 accumulation, no tap reaches before the token's document start)."""
        bias = None if self.conv1d_bias is None else cast(self.conv1d_bias, F32)
        out = causal_conv(hist, since_start, cast(self.conv1d_weight, F32), bias)
        return jax.nn.silu(out).astype(self.dtype)

    def _gated_norm(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """rmsnorm(y * silu(z)) per group of d_inner / G channels, times norm_weight; float32
        math, result in the compute dtype. y [B, T, H, P] float32, z [B, T, d_inner]."""
        b, t = z.shape[:2]
        g = y.reshape(b, t, self.d_inner) * jax.nn.silu(z.astype(F32))
        g = g.reshape(b, t, self.num_groups, -1)
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.eps)
        g = g.reshape(b, t, self.d_inner) * self.norm_weight[...].astype(F32)
        return g.astype(self.dtype)

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None
    ) -> tuple[jax.Array, dict | None, Aux]:
        b, t, _ = x.shape
        h, p, gn = self.num_heads, self.head_dim, self.num_groups * self.state_dim
        proj = jnp.einsum("btd,df->btf", x, cast(self.in_proj, self.dtype))
        if self.in_proj_bias is not None:
            proj = proj + cast(self.in_proj_bias, self.dtype)
        proj = checkpoint_name(proj, "ssm_in")
        z, xbc, dt = jnp.split(proj, [self.d_inner, self.d_inner + self.conv_channels], axis=-1)

        real = info.segment_ids > 0
        since_start = tokens_since_start(info, cached=cache is not None)
        xbc = jnp.where(real[..., None], xbc, 0)
        hist = history(xbc, None if cache is None else cache["conv"], self.conv_width)
        xs, bs, cs = jnp.split(
            self._conv(hist, since_start), [self.d_inner, self.d_inner + gn], axis=-1
        )

        xs = jnp.where(real[..., None], xs, 0).reshape(b, t, h, p).astype(F32)
        xs = constrain(xs, ("batch", "length", "act_heads", None))
        bs = bs.reshape(b, t, self.num_groups, self.state_dim).astype(F32)
        cs = cs.reshape(b, t, self.num_groups, self.state_dim).astype(F32)
        dt = jax.nn.softplus(dt.astype(F32) + self.dt_bias[...].astype(F32))
        dt = jnp.where(real[..., None], jnp.clip(dt, *self.dt_limit), 0.0)
        y, state = ssd(
            xs,
            dt,
            -jnp.exp(self.A_log[...].astype(F32)),
            bs,
            cs,
            self.D[...].astype(F32),
            h0=None if cache is None else cache["ssm"],
            reset=real & (since_start == 0),
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        y = constrain(y, ("batch", "length", "act_heads", None))
        out = jnp.einsum("bte,ed->btd", self._gated_norm(y, z), cast(self.out_proj, self.dtype))
        if self.out_proj_bias is not None:
            out = out + cast(self.out_proj_bias, self.dtype)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_embed")), "ssm_out")
        if cache is None:
            return out, None, {}
        # Conv state: the K-1 inputs ending at each row's last real token (padding is on the
        # right); the SSM state already stopped there (padding has dt = 0).
        conv = tail(hist, since_start, real, cache["conv"], self.conv_width - 1)
        return out, {"conv": conv, "ssm": state}, {}

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        """In/out projections, the depthwise conv, and the chunked SSD: within a chunk of
        L = min(chunk_size, seq_len) tokens the C.B scores and the weighted sum of values over the
        whole L x L block (as executed), plus writing the chunk state and reading the incoming
        one."""
        s = cfg.ssm
        d_inner = s.expand * cfg.d_model
        gn = s.num_groups * s.state_dim
        heads = d_inner // s.head_dim
        proj = 2 * cfg.d_model * (2 * d_inner + 2 * gn + heads) + 2 * d_inner * cfg.d_model
        conv = 2 * s.conv_width * (d_inner + 2 * gn)
        chunk = min(s.chunk_size, seq_len)
        return proj + conv + 2 * chunk * (gn + d_inner) + 2 * 2 * d_inner * s.state_dim

    @staticmethod
    def init_cache(cfg: ConfigDict, batch: int, length: int, dtype: jnp.dtype) -> dict:
        """Recurrent state, the same size for any ``length``: conv [B, K-1, Cc] (``dtype``, the
        last K-1 conv inputs) and ssm [B, H, P, N] (float32)."""
        del length
        s = cfg.ssm
        d_inner = int(s.expand * cfg.d_model)
        channels = d_inner + 2 * s.num_groups * s.state_dim
        return {
            "conv": jnp.zeros((batch, s.conv_width - 1, channels), dtype),
            "ssm": jnp.zeros((batch, d_inner // s.head_dim, s.head_dim, s.state_dim), F32),
        }

    @staticmethod
    def cache_axes() -> dict:
        return {
            "conv": ("cache_batch", "conv_width", "ssm_conv"),
            "ssm": ("cache_batch", "cache_ssm_heads", "head_dim", "ssm_state"),
        }
