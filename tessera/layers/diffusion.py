"""Diffusion building blocks shared by the VAE, the U-Net and the DiT, in diffusers' layout and
math (``diffusers.models.embeddings`` / ``resnet``): sinusoidal timestep features, the timestep
MLP, the ResNet block with an optional timestep projection, and 2x down- / up-sampling.

Feature maps are [B, H, W, C] (``layers/conv.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from tessera.layers.conv import Conv2d, Dense, GroupNorm


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10_000.0,
    scale: float = 1.0,
) -> jax.Array:
    """Sinusoidal features float32 [B, dim] of timesteps t [B] (int or float), diffusers'
    ``get_timestep_embedding``: frequencies ``exp(-ln(max_period) * k / (dim / 2 - freq_shift))``
    for k < dim / 2, features ``[sin, cos]`` (``[cos, sin]`` with ``flip_sin_to_cos``), a zero
    column appended when ``dim`` is odd. The U-Net uses shift 0 with its config's flip, DiT
    shift 1 with flip."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = scale * t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepMLP(nnx.Module):
    """Timestep features [B, in] -> embedding [B, dim]: ``linear_1``, SiLU, ``linear_2``
    (diffusers' ``TimestepEmbedding``)."""

    def __init__(
        self, in_features: int, dim: int, *, dtype: str, param_dtype: str, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Dense(in_features, dim, axes=(None, "mlp"), **kw)
        self.linear_2 = Dense(dim, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """diffusers' ``ResnetBlock2D`` (default time-embedding norm, output scale 1):
    ``h = conv1(silu(norm1(x)))``, plus ``time_emb_proj(silu(temb))`` per channel when the block
    has a timestep embedding (``temb_dim``), ``h = conv2(dropout(silu(norm2(h))))``, and the
    residual ``x`` (through the 1x1 ``conv_shortcut`` when the channel count changes) plus h.
    x [B, H, W, C_in] -> [B, H, W, C_out]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_dim: int | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        dtype: str = "float32",
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(groups=groups, eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(in_channels, **norm)
        self.conv1 = Conv2d(in_channels, out_channels, 3, **kw)
        self.time_emb_proj = (
            Dense(temb_dim, out_channels, axes=("embed", "conv_out"), **kw) if temb_dim else None
        )
        self.norm2 = GroupNorm(out_channels, **norm)
        self.conv2 = Conv2d(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D with a timestep projection needs temb")
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip.astype(h.dtype) + h


class Downsample2D(nnx.Module):
    """Halve H and W with a stride-2 3x3 ``conv``. ``asymmetric_pad`` (the VAE encoder's): pad
    one pixel on the bottom and right only, then convolve without padding; else pad one pixel on
    every side (the U-Net's)."""

    def __init__(
        self,
        channels: int,
        *,
        asymmetric_pad: bool = False,
        dtype: str = "float32",
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        self.asymmetric_pad = asymmetric_pad
        self.conv = Conv2d(
            channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.asymmetric_pad:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 ``conv``."""

    def __init__(
        self, channels: int, *, dtype: str = "float32", param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


def indexed(modules: Iterable[nnx.Module]) -> nnx.Dict:
    """Modules under the keys "0", "1", ...: parameter paths then read as diffusers' names
    (``down_blocks/0/resnets/1``), which the converter's rules spell with string keys."""
    return nnx.Dict({str(i): m for i, m in enumerate(modules)})


def listed(modules: nnx.Dict) -> list[nnx.Module]:
    """The modules of ``indexed`` in order."""
    return [modules[str(i)] for i in range(len(modules))]
