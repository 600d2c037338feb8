"""RMSNorm (statistics in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tessera.layers.base import ones, param


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
