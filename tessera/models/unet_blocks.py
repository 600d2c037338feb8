"""The U-Net's blocks (``models/unet.py``), in diffusers' ``UNet2DConditionModel`` layout and math:
the spatial transformer (``Transformer2D``: diffusers' ``Transformer2DModel`` of
``BasicTransformerBlock``s with a GEGLU feed-forward), one resolution level of the down or up path
(``UNetLevel``: ``CrossAttnDownBlock2D`` / ``DownBlock2D`` / ``CrossAttnUpBlock2D`` /
``UpBlock2D``) and the middle block (``UNetMid``: ``UNetMidBlock2DCrossAttn``).

Feature maps are [B, H, W, C]; the conditioning sequence ``context`` is [B, S, D_ctx].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.layers.conv import FEATURE_AXES, Conv2d, CrossAttention, Dense, GroupNorm
from tessera.layers.diffusion import Downsample2D, ResnetBlock2D, Upsample2D, indexed, listed
from tessera.layers.norms import LayerNorm
from tessera.models.remat import remat_policy
from tessera.sharding import constrain

TRANSFORMER_NORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms
SPATIAL_NORM_EPS = 1e-6  # Transformer2DModel's GroupNorm
FF_MULT = 4  # GEGLU feed-forward width: FF_MULT x channels


@dataclasses.dataclass(frozen=True)
class Level:
    """What one block of the U-Net holds: ``resnets`` (in, out) channels of each ResNet block
    (skip channels included on the up path), ``attentions`` transformer blocks (after each
    resnet on the down / up path; between the two resnets in the middle), ``heads`` of each,
    ``resample`` (a 2x down- / up-sampling at the end) and ``factor``: the block's input is
    image_size / factor pixels wide."""

    resnets: tuple[tuple[int, int], ...]
    attentions: int
    heads: int
    resample: bool
    factor: int

    @property
    def channels(self) -> int:
        return self.resnets[-1][1]


def block_runner(remat: str) -> Callable[..., Any]:
    """``run(module, *args) = module(*args)``, rematerialised under the ``model.remat`` policy
    (``models/remat.py``) unless it is ``none``."""

    def call(module: nnx.Module, *args: Any) -> Any:
        return module(*args)

    policy = remat_policy(remat)
    return call if policy is None else nnx.remat(call, policy=policy)


def _kw(cfg: ConfigDict, rngs: nnx.Rngs) -> dict[str, Any]:
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class GEGLUFeedForward(nnx.Module):
    """diffusers' ``FeedForward(activation_fn="geglu")``: x [..., D] -> ``proj`` [D, 2F] split
    into (hidden, gate), ``hidden * gelu(gate)`` (exact gelu), ``out`` [F, D]; F = 4 D."""

    def __init__(self, dim: int, cfg: ConfigDict, *, rngs: nnx.Rngs):
        inner = FF_MULT * dim
        self.proj = Dense(dim, 2 * inner, axes=("embed", "mlp"), **_kw(cfg, rngs))
        self.out = Dense(inner, dim, axes=("mlp", "embed"), **_kw(cfg, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(hidden * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """Tokens x [B, T, D] -> [B, T, D]: pre-LayerNorm self-attention (``attn1``), cross-attention
    over ``context`` [B, S, D_ctx] (``attn2``) and the GEGLU feed-forward (``ff``), each a
    residual; ``heads`` x D / heads attention without q/k/v biases."""

    def __init__(self, dim: int, heads: int, cfg: ConfigDict, *, rngs: nnx.Rngs):
        u, kw = cfg.unet, _kw(cfg, rngs)
        norm = dict(eps=TRANSFORMER_NORM_EPS, param_dtype=cfg.param_dtype, rngs=rngs)
        attn = dict(heads=heads, head_dim=dim // heads, impl=cfg.attention_impl, **kw)
        self.norm1 = LayerNorm(dim, **norm)
        self.attn1 = CrossAttention(dim, **attn)
        self.norm2 = LayerNorm(dim, **norm)
        self.attn2 = CrossAttention(dim, context_dim=u.cross_attention_dim, **attn)
        self.norm3 = LayerNorm(dim, **norm)
        self.ff = GEGLUFeedForward(dim, cfg, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
    """diffusers' ``Transformer2DModel`` on x [B, H, W, C]: GroupNorm (eps 1e-6), ``proj_in``
    (a dense layer with ``use_linear_projection``, else a 1x1 conv: the same map per pixel),
    ``model.unet.transformer_layers`` BasicTransformerBlocks over the H*W tokens, ``proj_out``,
    plus x."""

    def __init__(self, channels: int, heads: int, cfg: ConfigDict, *, rngs: nnx.Rngs):
        u, kw = cfg.unet, _kw(cfg, rngs)
        self.norm = GroupNorm(
            channels, groups=u.norm_groups, eps=SPATIAL_NORM_EPS, param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        if u.use_linear_projection:
            self.proj_in = Dense(channels, channels, axes=("embed", "mlp"), **kw)
            self.proj_out = Dense(channels, channels, axes=("mlp", "embed"), **kw)
        else:
            self.proj_in = Conv2d(channels, channels, 1, **kw)
            self.proj_out = Conv2d(channels, channels, 1, **kw)
        self.transformer_blocks = indexed(
            BasicTransformerBlock(channels, heads, cfg, rngs=rngs)
            for _ in range(u.transformer_layers)
        )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in listed(self.transformer_blocks):
            y = block(y, context)
        return x + self.proj_out(y.reshape(b, h, w, c))


class UNetLevel(nnx.Module):
    """One level of the down path (``up=False``: resnets, each followed by a Transformer2D when
    the level attends, then a stride-2 ``resample`` conv) or of the up path (each resnet takes
    the last skip concatenated after its input's channels; a nearest-neighbour 2x ``resample``
    at the end). x [B, H, W, C_in] -> [B, H', W', C_out]."""

    def __init__(self, level: Level, cfg: ConfigDict, *, up: bool, temb_dim: int,
                 rngs: nnx.Rngs):
        u, kw = cfg.unet, _kw(cfg, rngs)
        self.up = up
        self.remat = cfg.get("remat", "none")
        self.resnets = indexed(
            ResnetBlock2D(i, o, temb_dim=temb_dim, groups=u.norm_groups, eps=u.norm_eps, **kw)
            for i, o in level.resnets
        )
        self.attentions = indexed(
            Transformer2D(level.channels, level.heads, cfg, rngs=rngs)
            for _ in range(level.attentions)
        )
        sampler = Upsample2D if up else Downsample2D
        self.resample = sampler(level.channels, **kw) if level.resample else None

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array, skips: list[jax.Array]
    ) -> jax.Array:
        """Down: appends every resnet (or transformer) output and the downsampled map to
        ``skips``; up: pops one skip per resnet."""
        run, attentions = block_runner(self.remat), listed(self.attentions)
        for i, resnet in enumerate(listed(self.resnets)):
            if self.up:
                x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = run(resnet, x, temb)
            if attentions:
                x = run(attentions[i], x, context)
            x = constrain(x, FEATURE_AXES)
            if not self.up:
                skips.append(x)
        if self.resample is not None:
            x = constrain(self.resample(x), FEATURE_AXES)
            if not self.up:
                skips.append(x)
        return x


class UNetMid(UNetLevel):
    """diffusers' ``UNetMidBlock2DCrossAttn``: resnet, then (Transformer2D, resnet) pairs, all
    at the lowest resolution. x [B, h, w, C] -> [B, h, w, C]."""

    def __init__(self, level: Level, cfg: ConfigDict, *, temb_dim: int, rngs: nnx.Rngs):
        super().__init__(level, cfg, up=False, temb_dim=temb_dim, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        run, resnets = block_runner(self.remat), listed(self.resnets)
        x = run(resnets[0], x, temb)
        for attention, resnet in zip(listed(self.attentions), resnets[1:]):
            x = run(resnet, run(attention, x, context), temb)
        return constrain(x, FEATURE_AXES)
