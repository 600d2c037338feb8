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
from tessera.layers.base import Initializer, cast, normal, ones, param, zeros
from tessera.layers.mixers.base import Aux, SeqInfo
from tessera.sharding import constrain


def mamba_dims(cfg: ConfigDict) -> tuple[int, int, int, int]:
    """(d_inner, state N, conv width K, dt rank R) of ``cfg`` (the model section)."""
    s = cfg.ssm
    d_inner = int(s.expand * cfg.d_model)
    dt_rank = int(s.dt_rank) or math.ceil(cfg.d_model / 16)
    return d_inner, int(s.state_dim), int(s.conv_width), dt_rank


def uniform(bound: float) -> Initializer:
    """U(-bound, bound): the conv kernel (bound = 1/sqrt(fan_in), torch's default) and the dt
    projection (bound = 1/sqrt(dt_rank), as in Mamba)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dt_bias_init(dt_min: float, dt_max: float, floor: float) -> Initializer:
    """Inverse softplus of dt ~ log-uniform in [dt_min, dt_max] (floored), as in Mamba, so the
    initial step sizes ``softplus(bias)`` span that range."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        lo, hi = math.log(dt_min), math.log(dt_max)
        dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (hi - lo) + lo)
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """A = -exp(A_log) = -(1, 2, ..., N) for every channel (S4D-real)."""
    del key
    a_log = jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32))
    return jnp.broadcast_to(a_log, shape).astype(dtype)


def document_starts(info: SeqInfo, cached: bool) -> jax.Array:
    """bool [B, T]: real tokens before which the state resets. Without a cache every segment
    change (and position 0) starts a document; with one, all real tokens of a row are one
    sequence that continues the cache, and only position 0 starts afresh."""
    real = info.segment_ids > 0
    starts = info.positions == 0
    if not cached:
        prev = jnp.pad(info.segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
        starts |= info.segment_ids != prev
    return real & starts


class Mamba(nnx.Module):
    """[B, T, D] -> [B, T, D]; ``__call__(x, info, cache) -> (y, new_cache, aux)``."""

    REMAT_SAVED = ("ssm_in", "ssm_out")
    LOGICAL_RULES = {
        "act_ssm_inner": ("tensor",),
        "ssm_inner": ("tensor",),
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
        self.conv_weight = param(rngs, uniform(k**-0.5), (k, di), ("conv_width", "ssm_inner"), pd)
        self.x_proj = param(rngs, init, (di, r + 2 * n), ("ssm_inner", "ssm_proj"), pd)
        self.dt_proj_weight = param(rngs, uniform(r**-0.5), (r, di), ("ssm_rank", "ssm_inner"), pd)
        self.dt_proj_bias = param(
            rngs, dt_bias_init(s.dt_min, s.dt_max, s.dt_init_floor), (di,), ("ssm_inner",), pd
        )
        self.A_log = param(rngs, a_log_init, (di, n), ("ssm_inner", "ssm_state"), pd)
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

    def _conv(self, x: jax.Array, prev: jax.Array, last_start: jax.Array) -> jax.Array:
        """Causal depthwise conv + SiLU of x [B, T, Di] after the K-1 inputs ``prev``
        [B, K-1, Di]; a tap reaching before the latest document start ``last_start`` [B, T]
        (call-relative index, -2K: none this call) reads zero. Float32 accumulation."""
        k, t = self.conv_width, x.shape[1]
        xs = jnp.concatenate([prev, x], axis=1).astype(jnp.float32)
        w = cast(self.conv_weight, jnp.float32)
        index = jnp.arange(t)
        acc = 0.0
        for tap in range(k):
            valid = (index - (k - 1 - tap))[None, :] >= last_start
            acc = acc + jnp.where(valid[..., None], xs[:, tap : tap + t] * w[tap], 0.0)
        if self.conv_bias is not None:
            acc = acc + cast(self.conv_bias, jnp.float32)
        return jax.nn.silu(acc).astype(self.dtype)

    def _conv_state(
        self, x: jax.Array, prev: jax.Array, last_start: jax.Array, real: jax.Array
    ) -> jax.Array:
        """The last K-1 conv inputs [B, K-1, Di] up to each row's last real token; inputs from
        before that token's document start are zeros. A row without real tokens keeps ``prev``."""
        k, t = self.conv_width, x.shape[1]
        xs = jnp.concatenate([prev, x.astype(prev.dtype)], axis=1)
        length = jnp.max(jnp.where(real, jnp.arange(1, t + 1), 0), axis=1)  # [B]
        idx = length[:, None] + jnp.arange(k - 1)  # into xs; call-relative index is idx - (K-1)
        start = jnp.take_along_axis(last_start, jnp.maximum(length - 1, 0)[:, None], axis=1)
        start = jnp.where(length[:, None] > 0, start, -2 * k)
        kept = jnp.take_along_axis(xs, idx[..., None], axis=1)
        return jnp.where((idx - (k - 1) >= start)[..., None], kept, 0)

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None
    ) -> tuple[jax.Array, dict | None, Aux]:
        """x [B, T, D] -> (y [B, T, D], the cache after each row's last real token or None, {}).

        Without a cache, rows may pack documents (segment ids, positions restarting at 0);
        with one, each row continues its cached sequence and may be right-padded."""
        b, t, _ = x.shape
        di, n, k, r = self.d_inner, self.state_dim, self.conv_width, self.dt_rank
        cd = self.dtype
        xz = jnp.einsum("btd,dsi->btsi", x, cast(self.in_proj, cd))
        if self.in_proj_bias is not None:
            xz = xz + cast(self.in_proj_bias, cd)
        xz = checkpoint_name(constrain(xz, ("batch", "length", None, "act_ssm_inner")), "ssm_in")
        real = info.segment_ids > 0
        xc = jnp.where(real[..., None], xz[:, :, 0], 0)  # the conv input; 0 under padding
        z = xz[:, :, 1]

        starts = document_starts(info, cached=cache is not None)
        # Latest document start at or before each token (call-relative; -2K: none this call).
        last_start = jax.lax.cummax(jnp.where(starts, jnp.arange(t), -2 * k), axis=1)
        prev = jnp.zeros((b, k - 1, di), cd) if cache is None else cache["conv"].astype(cd)
        u = jnp.where(real[..., None], self._conv(xc, prev, last_start), 0)
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
            conv = self._conv_state(xc, cache["conv"], last_start, real)
            new_cache = {"conv": conv, "ssm": h.astype(cache["ssm"].dtype)}
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
