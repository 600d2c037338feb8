"""RMSNorm and LayerNorm (statistics in float32), and ``make_norm``: the one a config names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.layers.base import ones, param, zeros


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis; ``x``: [..., dim]."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        param_dtype: str = "float32",
        axis_name: str = "norm",
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """``(x - mean(x)) / sqrt(var(x) + eps) * scale + bias`` over the last axis; ``x``: [..., dim].

    Mean and (biased) variance in float32, as torch's ``nn.LayerNorm`` and Flax's.
    """

    def __init__(
        self, dim: int, *, eps: float = 1e-6, param_dtype: str = "float32", rngs: nnx.Rngs
    ):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centred = xf - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


NORMS: dict[str, type] = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def make_norm(cfg: ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    """The ``cfg.norm`` norm over ``cfg.d_model`` features, with ``cfg.norm_eps``."""
    if cfg.norm not in NORMS:
        raise ValueError(f"model.norm: unknown norm {cfg.norm!r}; known: {sorted(NORMS)}")
    return NORMS[cfg.norm](cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)


def head_group_norm(o: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """GroupNorm with one group per head (RWKV-6/7's ``ln_x``): o [B, T, H, V] normalised over
    each head's V channels in float32, then the affine ``weight`` / ``bias`` [H * V]; returns
    float32 [B, T, H * V]."""
    o = o.astype(jnp.float32)
    mean = jnp.mean(o, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(o - mean), axis=-1, keepdims=True)
    o = ((o - mean) * jax.lax.rsqrt(var + eps)).reshape(*o.shape[:2], -1)
    return o * weight.astype(jnp.float32) + bias.astype(jnp.float32)
