"""Mamba-1 sequence mixer (selective SSM), numerically the Hugging Face ``MambaMixer``.

    x, z = in_proj(h)                         [B, T, Di] each, Di = expand * d_model
    u    = silu(causal depthwise conv(x))     kernel conv_width over time, per channel
    dt, B, C = split(x_proj(u))               [B, T, R], [B, T, N], [B, T, N]
    dt   = softplus(dt_proj(dt))              [B, T, Di]
    y    = selective_scan(u, dt, -exp(A_log), B, C, D)
    out  = out_proj(y * silu(z))

Parameters and their Hugging Face ``MambaMixer`` tensors (torch layouts, ``hf.*``):

    in_proj         [D, 2, Di]  = hf.in_proj.weight [2Di, D] .T.reshape(D, 2, Di) (x first, then z)
    in_proj_bias    [2, Di]     = hf.in_proj.bias.reshape(2, Di)          (only with ssm.bias)
    conv_weight     [K, Di]     = hf.conv1d.weight [Di, 1, K] [:, 0, :].T (tap K-1: this token)
    conv_bias       [Di]        = hf.conv1d.bias                          (only with conv_bias)
    x_proj          [Di, R+2N]  = hf.x_proj.weight.T                      (columns: dt, B, C)
    dt_proj_weight  [R, Di]     = hf.dt_proj.weight.T
    dt_proj_bias    [Di]        = hf.dt_proj.bias
    A_log           [Di, N]     = hf.A_log
    D               [Di]        = hf.D
    out_proj        [Di, D]     = hf.out_proj.weight.T
    out_proj_bias   [D]         = hf.out_proj.bias                        (only with ssm.bias)

Packed rows: the state is reset and the conv sees no earlier input at each document start
(a segment change or position 0); padding (segment id 0) gets x = 0 and dt = 0 and so never
changes the state. With a cache (decode, prefill chunks), rows may be right-padded; the cache
keeps the last K-1 conv inputs and the SSM state after each row's last real token, so its size
and a step's cost do not depend on the position.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.kernels.selective_scan import selective_scan
from tessera.layers.base import cast, normal, ones, param, zeros
from tessera.layers.mixers.base import Aux, SeqInfo
from tessera.layers.mixers.recurrent import (
    a_log_init,
    causal_conv,
    document_starts,
    dt_bias_init,
    history,
    tail,
    tokens_since_start,
    uniform,
)
from tessera.sharding import constrain
from tessera.sharding.rules import FSDP_AXES


def mamba_dims(cfg: ConfigDict) -> tuple[int, int, int, int]:
    """(d_inner, state N, conv width K, dt rank R) of ``cfg`` (the model section)."""
    s = cfg.ssm
    d_inner = int(s.expand * cfg.d_model)
    dt_rank = int(s.dt_rank) or math.ceil(cfg.d_model / 16)
    return d_inner, int(s.state_dim), int(s.conv_width), dt_rank


class Mamba(nnx.Module):
    """[B, T, D] -> [B, T, D]; ``__call__(x, info, cache) -> (y, new_cache, aux)``."""

    REMAT_SAVED = ("ssm_in", "ssm_out")
    LOGICAL_RULES = {
        "act_ssm_inner": ("tensor",),
        "ssm_inner": ("tensor",),
        # The inner dimension of the parameters without an embed dimension (x_proj, dt_proj,
        # A_log, the conv kernel): FSDP splits it too.
        "ssm_inner_fsdp": ("tensor", *FSDP_AXES),
        "ssm_state": (),
        "ssm_proj": (),
        "conv_width": (),
        "ssm_branch": (),  # in_proj x | z
        "ssm_rank": (),  # dt rank
        "cache_ssm_inner": ("tensor",),
    }

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        s = cfg.ssm
        d = cfg.d_model
        di, n, k, r = mamba_dims(cfg)
        self.d_inner, self.state_dim, self.conv_width, self.dt_rank = di, n, k, r
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl, self.chunk_size = s.impl, int(s.chunk_size)
        pd, init = cfg.param_dtype, normal(cfg.init_std)
        self.in_proj = param(rngs, init, (d, 2, di), ("embed", "ssm_branch", "ssm_inner"), pd)
        self.conv_weight = param(
            rngs, uniform(k**-0.5), (k, di), ("conv_width", "ssm_inner_fsdp"), pd
        )
        self.x_proj = param(rngs, init, (di, r + 2 * n), ("ssm_inner_fsdp", "ssm_proj"), pd)
        self.dt_proj_weight = param(
            rngs, uniform(r**-0.5), (r, di), ("ssm_rank", "ssm_inner_fsdp"), pd
        )
        self.dt_proj_bias = param(
            rngs, dt_bias_init(s.dt_min, s.dt_max, s.dt_init_floor), (di,), ("ssm_inner",), pd
        )
        self.A_log = param(rngs, a_log_init, (di, n), ("ssm_inner_fsdp", "ssm_state"), pd)
        self.D = param(rngs, ones, (di,), ("ssm_inner",), pd)
        # Mamba's prenorm-residual rescaling: the output projection shrinks with depth.
        out_init = normal(cfg.init_std / math.sqrt(cfg.num_layers))
        self.out_proj = param(rngs, out_init, (di, d), ("ssm_inner", "embed"), pd)
        self.conv_bias = param(rngs, zeros, (di,), ("ssm_inner",), pd) if s.conv_bias else None
        if s.bias:
            self.in_proj_bias = param(rngs, zeros, (2, di), ("ssm_branch", "ssm_inner"), pd)
            self.out_proj_bias = param(rngs, zeros, (d,), ("embed",), pd)
        else:
            self.in_proj_bias = self.out_proj_bias = None

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None
    ) -> tuple[jax.Array, dict | None, Aux]:
        """x [B, T, D] -> (y [B, T, D], the cache after each row's last real token or None, {}).

        Without a cache, rows may pack documents (segment ids, positions restarting at 0);
        with one, each row continues its cached sequence and may be right-padded."""
        b, t, _ = x.shape
        n, k, r = self.state_dim, self.conv_width, self.dt_rank
        cd = self.dtype
        xz = jnp.einsum("btd,dsi->btsi", x, cast(self.in_proj, cd))
        if self.in_proj_bias is not None:
            xz = xz + cast(self.in_proj_bias, cd)
        xz = checkpoint_name(constrain(xz, ("batch", "length", None, "act_ssm_inner")), "ssm_in")
        real = info.segment_ids > 0
        xc = jnp.where(real[..., None], xz[:, :, 0], 0)  # the conv input; 0 under padding
        z = xz[:, :, 1]

        cached = cache is not None
        starts = document_starts(info, cached)
        since = tokens_since_start(info, cached)
        hist = history(xc, None if cache is None else cache["conv"], k)
        bias = None if self.conv_bias is None else cast(self.conv_bias, jnp.float32)
        conv = causal_conv(hist, since, cast(self.conv_weight, jnp.float32), bias)
        u = jnp.where(real[..., None], jax.nn.silu(conv).astype(cd), 0)
        u = constrain(u, ("batch", "length", "act_ssm_inner"))

        proj = jnp.einsum("bti,ip->btp", u, cast(self.x_proj, cd))
        dt_low, B, C = proj[..., :r], proj[..., r : r + n], proj[..., r + n :]
        dt = jnp.einsum("btr,ri->bti", dt_low, cast(self.dt_proj_weight, cd))
        dt = jax.nn.softplus(dt.astype(jnp.float32) + cast(self.dt_proj_bias, jnp.float32))
        dt = constrain(jnp.where(real[..., None], dt, 0.0), ("batch", "length", "act_ssm_inner"))
        A = -jnp.exp(cast(self.A_log, jnp.float32))
        y, h = selective_scan(
            u,
            dt,
            A,
            B,
            C,
            cast(self.D, jnp.float32),
            h0=None if cache is None else cache["ssm"],
            reset=starts,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        y = constrain(y.astype(cd) * jax.nn.silu(z), ("batch", "length", "act_ssm_inner"))
        out = jnp.einsum("bti,id->btd", y, cast(self.out_proj, cd))
        if self.out_proj_bias is not None:
            out = out + cast(self.out_proj_bias, cd)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_embed")), "ssm_out")
        new_cache = None
        if cache is not None:
            conv_state = tail(hist, since, real, cache["conv"], k - 1)
            new_cache = {"conv": conv_state, "ssm": h.astype(cache["ssm"].dtype)}
        return out, new_cache, {}

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        """In/x/dt/out projections, the depthwise conv, and the selective scan's elementwise work
        per (d_inner x N) state element: exp(dt A) (2), dt x B (1), the state update (2) and the
        C readout (2). Independent of ``seq_len`` (a recurrence).

        Model FLOPs, not the implementation's: the recurrence's work (the sequential form; XLA
        counts it within 5%). The chunked form's associative scan does about twice the scan's
        elementwise work, which MFU does not credit."""
        del seq_len
        di, n, k, r = mamba_dims(cfg)
        d = cfg.d_model
        proj = 2 * d * 2 * di + 2 * di * (r + 2 * n) + 2 * r * di + 2 * di * d
        return proj + 2 * k * di + 7 * di * n

    @staticmethod
    def init_cache(cfg: ConfigDict, batch: int, length: int, dtype: jnp.dtype) -> dict:
        """conv [B, K-1, Di] (``dtype``: the last K-1 conv inputs) and ssm [B, Di, N] float32;
        independent of ``length``: the state is constant-size."""
        del length
        di, n, k, _ = mamba_dims(cfg)
        return {
            "conv": jnp.zeros((batch, k - 1, di), dtype),
            "ssm": jnp.zeros((batch, di, n), jnp.float32),
        }

    @staticmethod
    def cache_axes() -> dict:
        return {
            "conv": ("cache_batch", "conv_width", "cache_ssm_inner"),
            "ssm": ("cache_batch", "cache_ssm_inner", "ssm_state"),
        }
