"""KL autoencoder of latent diffusion: ``model.name = "vae"`` (Stable Diffusion's
``AutoencoderKL``, its layout and math).

``VAE(cfg, rngs=)`` with ``cfg`` = ``config.model`` (``image_size``, ``num_channels``, ``dtype``,
``param_dtype``, ``attention_impl`` and ``model.vae.*``). L = ``len(block_out_channels)``
levels, downsampling factor f = 2 ** (L - 1), latent width Z = ``latent_channels``:

    encode(images [B, H, W, C] in [-1, 1]) -> (mean, logvar)   float32 [B, H/f, W/f, Z]
    decode(z [B, H/f, W/f, Z]) -> images                         float32 [B, H, W, C]
    __call__(images, *, rng=None, train=False) -> VAEOutput(reconstruction, mean, logvar)
    to_latents(images, rng=None) -> (z - shift_factor) * scaling_factor   (the denoiser's input)
    from_latents(latents) -> decode(latents / scaling_factor + shift_factor)

The encoder: ``conv_in``; per level ``layers_per_block`` ResNet blocks (no timestep embedding)
and, except at the last level, a stride-2 downsampling conv (padded bottom / right only); a mid
block (ResNet, single-head self-attention over the H/f x W/f positions with a GroupNorm in front
and a residual, ResNet); GroupNorm, SiLU, ``conv_out`` to 2Z channels (mean | logvar, logvar
clipped to [-30, 20]); the 1x1 ``quant_conv``. The decoder mirrors it: the 1x1
``post_quant_conv``, ``conv_in``, the mid block, levels from the deepest up with
``layers_per_block + 1`` ResNet blocks and, except at the last, nearest 2x upsampling plus a
conv; GroupNorm, SiLU, ``conv_out``. Every GroupNorm has ``norm_groups`` groups and ``norm_eps``.

Parameter tree (diffusers' names with ``/``; ``<i>`` a level, ``<j>`` a block; kernels HWIO):

    encoder/conv_in, conv_out                        kernel, bias
    encoder/down_blocks/<i>/resnets/<j>/...          ResnetBlock2D: norm1, conv1, norm2, conv2,
                                                     conv_shortcut (1x1, when channels change)
    encoder/down_blocks/<i>/resample/conv            Downsample2D (not at the last level)
    encoder/mid_block/resnets/{0,1}/...
    encoder/mid_block/attention/group_norm           scale, bias
    encoder/mid_block/attention/attn/to_q, to_k, to_v, to_out    kernel [C, C], bias [C]
    encoder/norm_out                                 scale, bias   (diffusers' conv_norm_out)
    quant_conv, post_quant_conv                      kernel [1, 1, *, *], bias
    decoder/conv_in, mid_block, norm_out, conv_out   as the encoder's
    decoder/up_blocks/<i>/resnets/<j>/..., up_blocks/<i>/resample/conv   (Upsample2D)

Levels and blocks are ``nnx.Dict`` keyed "0", "1", ... so a path reads as the diffusers name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.layers.conv import FEATURE_AXES, Conv2d, CrossAttention, GroupNorm
from tessera.layers.diffusion import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    indexed,
    listed,
)
from tessera.sharding import constrain

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


class VAEOutput(NamedTuple):
    """``reconstruction`` float32 [B, H, W, C]; ``mean`` / ``logvar`` float32 [B, h, w, Z]."""

    reconstruction: jax.Array
    mean: jax.Array
    logvar: jax.Array


def _check_config(cfg: ConfigDict) -> None:
    """One-line ValueErrors for vae settings that cannot work."""
    v = cfg.vae
    channels = tuple(v.block_out_channels)
    if not channels or min(channels) <= 0:
        raise ValueError(f"model.vae.block_out_channels={channels} needs positive entries")
    for name in ("layers_per_block", "latent_channels", "norm_groups"):
        if v[name] <= 0:
            raise ValueError(f"model.vae.{name}={v[name]} must be positive")
    if cfg.num_channels <= 0:
        raise ValueError(f"model.num_channels={cfg.num_channels} must be positive")
    bad = [c for c in channels if c % v.norm_groups]
    if bad:
        raise ValueError(
            f"model.vae.block_out_channels={channels}: {bad[0]} channels do not split into "
            f"model.vae.norm_groups={v.norm_groups} groups"
        )
    f = 2 ** (len(channels) - 1)
    if cfg.image_size <= 0 or cfg.image_size % f:
        raise ValueError(
            f"model.image_size={cfg.image_size} is not divisible by the vae's downsampling "
            f"factor {f} (2 ** (len(model.vae.block_out_channels) - 1))"
        )
    if v.scaling_factor == 0:
        raise ValueError("model.vae.scaling_factor must be non-zero")


class LayerSettings(NamedTuple):
    """What every layer of one VAE is built with (``model.vae``'s norm settings, the model's
    dtypes and attention impl), and its builders of ResNet blocks, convs and GroupNorms."""

    groups: int
    eps: float
    dtype: str
    param_dtype: str
    impl: str

    def resnet(self, cin: int, cout: int, rngs: nnx.Rngs) -> ResnetBlock2D:
        return ResnetBlock2D(cin, cout, groups=self.groups, eps=self.eps, dtype=self.dtype,
                             param_dtype=self.param_dtype, rngs=rngs)

    def conv(self, cin: int, cout: int, k: int, rngs: nnx.Rngs) -> Conv2d:
        return Conv2d(cin, cout, k, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

    def norm(self, channels: int, rngs: nnx.Rngs) -> GroupNorm:
        return GroupNorm(channels, groups=self.groups, eps=self.eps,
                         param_dtype=self.param_dtype, rngs=rngs)


class SpatialSelfAttention(nnx.Module):
    """The mid block's attention (diffusers' ``Attention`` with ``residual_connection``):
    x [B, H, W, C] -> x + attn(group_norm(x)) over the H*W positions, one head of all C
    channels, q/k/v/out projections with biases."""

    def __init__(self, channels: int, kw: LayerSettings, *, rngs: nnx.Rngs):
        self.group_norm = kw.norm(channels, rngs)
        self.attn = CrossAttention(
            channels, heads=1, head_dim=channels, qkv_bias=True, impl=kw.impl, dtype=kw.dtype,
            param_dtype=kw.param_dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.attn(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)
        return x + y.astype(x.dtype)


class MidBlock(nnx.Module):
    """ResNet, self-attention (``attention``: None without ``mid_attention``), ResNet at a fixed
    width: [B, h, w, C] -> [B, h, w, C]."""

    def __init__(self, channels: int, attention: bool, kw: LayerSettings, *, rngs: nnx.Rngs):
        self.resnets = indexed(kw.resnet(channels, channels, rngs) for _ in range(2))
        self.attention = SpatialSelfAttention(channels, kw, rngs=rngs) if attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        first, second = listed(self.resnets)
        x = first(x)
        if self.attention is not None:
            x = self.attention(x)
        return second(x)


class Level(nnx.Module):
    """One resolution level: ``count`` ResNet blocks ``cin -> cout`` (the first changes the
    width), then ``resample``: "down" (stride-2, asymmetric pad), "up" (nearest 2x + conv) or
    None. diffusers' ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        count: int,
        resample: str | None,
        kw: LayerSettings,
        *,
        rngs: nnx.Rngs,
    ):
        self.resnets = indexed(
            kw.resnet(cin if j == 0 else cout, cout, rngs) for j in range(count)
        )
        args = dict(dtype=kw.dtype, param_dtype=kw.param_dtype, rngs=rngs)
        self.resample = (
            Downsample2D(cout, asymmetric_pad=True, **args) if resample == "down"
            else Upsample2D(cout, **args) if resample == "up"
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in listed(self.resnets):
            x = resnet(x)
        x = x if self.resample is None else self.resample(x)
        return constrain(x, FEATURE_AXES)


class Encoder(nnx.Module):
    """images [B, H, W, C] -> moments [B, H/f, W/f, 2Z] (before ``quant_conv``)."""

    def __init__(self, cfg: ConfigDict, kw: LayerSettings, *, rngs: nnx.Rngs):
        v = cfg.vae
        ch, n = tuple(v.block_out_channels), v.layers_per_block
        self.conv_in = kw.conv(cfg.num_channels, ch[0], 3, rngs)
        self.down_blocks = indexed(
            Level(ch[max(i - 1, 0)], c, n, "down" if i < len(ch) - 1 else None, kw, rngs=rngs)
            for i, c in enumerate(ch)
        )
        self.mid_block = MidBlock(ch[-1], v.mid_attention, kw, rngs=rngs)
        self.norm_out = kw.norm(ch[-1], rngs)
        self.conv_out = kw.conv(ch[-1], 2 * v.latent_channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for level in listed(self.down_blocks):
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """z [B, h, w, Z] (after ``post_quant_conv``) -> images [B, f h, f w, C]."""

    def __init__(self, cfg: ConfigDict, kw: LayerSettings, *, rngs: nnx.Rngs):
        v = cfg.vae
        ch, n = tuple(reversed(v.block_out_channels)), v.layers_per_block + 1
        self.conv_in = kw.conv(v.latent_channels, ch[0], 3, rngs)
        self.mid_block = MidBlock(ch[0], v.mid_attention, kw, rngs=rngs)
        self.up_blocks = indexed(
            Level(ch[max(i - 1, 0)], c, n, "up" if i < len(ch) - 1 else None, kw, rngs=rngs)
            for i, c in enumerate(ch)
        )
        self.norm_out = kw.norm(ch[-1], rngs)
        self.conv_out = kw.conv(ch[-1], cfg.num_channels, 3, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for level in listed(self.up_blocks):
            x = level(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class VAE(nnx.Module):
    """KL autoencoder (see the module docstring)."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # later edits of the caller's config stay out
        _check_config(cfg)
        self.cfg = cfg
        v = cfg.vae
        kw = LayerSettings(
            v.norm_groups, v.norm_eps, cfg.dtype, cfg.param_dtype, cfg.attention_impl
        )
        z = v.latent_channels
        self.encoder = Encoder(cfg, kw, rngs=rngs)
        self.quant_conv = kw.conv(2 * z, 2 * z, 1, rngs)
        self.post_quant_conv = kw.conv(z, z, 1, rngs)
        self.decoder = Decoder(cfg, kw, rngs=rngs)

    @property
    def downsample_factor(self) -> int:
        """f: pixels per latent position along each side."""
        return 2 ** (len(self.cfg.vae.block_out_channels) - 1)

    def _check(self, x: jax.Array, what: str, channels: int, field: str, multiple: int) -> None:
        if (x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % multiple
                or x.shape[2] % multiple or not jnp.issubdtype(x.dtype, jnp.floating)):
            raise ValueError(
                f"vae expects {what} float [batch, height, width, {channels}] ({field}), height "
                f"and width multiples of {multiple}; got {x.dtype} {list(x.shape)}"
            )

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, C] in [-1, 1] -> (mean, logvar) float32 [B, H/f, W/f, Z]."""
        self._check(images, "images", self.cfg.num_channels, "model.num_channels",
                    self.downsample_factor)
        x = constrain(images, FEATURE_AXES)
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents z [B, h, w, Z] -> images float32 [B, f h, f w, C] (about [-1, 1])."""
        self._check(z, "latents", self.cfg.vae.latent_channels, "model.vae.latent_channels", 1)
        x = self.post_quant_conv(constrain(z, FEATURE_AXES))
        return constrain(self.decoder(x).astype(jnp.float32), FEATURE_AXES)

    @staticmethod
    def sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
        """z = mean + exp(logvar / 2) * eps, eps ~ N(0, 1)."""
        eps = jax.random.normal(rng, mean.shape, mean.dtype)
        return mean + jnp.exp(0.5 * logvar) * eps

    def __call__(
        self, images: jax.Array, *, rng: jax.Array | None = None, train: bool = False
    ) -> VAEOutput:
        """Encode, take z (a posterior sample with ``train`` and an ``rng``, else the mean),
        decode."""
        mean, logvar = self.encode(images)
        z = self.sample(mean, logvar, rng) if train and rng is not None else mean
        return VAEOutput(self.decode(z), mean, logvar)

    def to_latents(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """The denoiser's latents (z - shift_factor) * scaling_factor, float32 [B, h, w, Z]; z
        is the posterior mean, or a sample with ``rng``."""
        mean, logvar = self.encode(images)
        z = mean if rng is None else self.sample(mean, logvar, rng)
        v = self.cfg.vae
        return (z - v.shift_factor) * v.scaling_factor

    def from_latents(self, latents: jax.Array) -> jax.Array:
        """Images float32 [B, H, W, C] from the denoiser's latents (inverse of ``to_latents``)."""
        v = self.cfg.vae
        return self.decode(latents / v.scaling_factor + v.shift_factor)


def _taps(size: int, k: int, stride: int, pad: int) -> int:
    """(output, kernel tap) pairs along one axis whose input pixel is inside the image (taps
    on the zero padding do no work, and XLA does not count them)."""
    out = (size + 2 * pad - k) // stride + 1
    return sum(0 <= o * stride + t - pad < size for o in range(out) for t in range(k))


def _conv(size: int, cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = -1) -> float:
    """Forward FLOPs of a k x k conv over a size x size input (padding k // 2 unless given)."""
    return 2.0 * _taps(size, k, stride, k // 2 if pad < 0 else pad) ** 2 * cin * cout


def _resnet(size: int, cin: int, cout: int) -> float:
    return _conv(size, cin, cout) + _conv(size, cout, cout) + (
        _conv(size, cin, cout, 1) if cin != cout else 0.0
    )


def _mid(size: int, c: int, attention: bool) -> float:
    t = size * size
    attn = 4 * 2.0 * t * c * c + 2 * 2.0 * t * t * c  # q, k, v, out; scores and values
    return 2 * _resnet(size, c, c) + (attn if attention else 0.0)


def _levels(size: int, ch: Sequence[int], count: int, resample: str) -> tuple[float, int]:
    """(FLOPs, output size) of the levels ``ch`` starting at ``size``, each of ``count`` ResNet
    blocks and, except the last, a resampling conv: stride 2 over the input padded by one
    pixel bottom / right ("down"), or over the nearest-upsampled 2 size ("up")."""
    total = 0.0
    for i, c in enumerate(ch):
        total += _resnet(size, ch[max(i - 1, 0)], c) + (count - 1) * _resnet(size, c, c)
        if i < len(ch) - 1:
            if resample == "down":
                total += _conv(size + 1, c, c, stride=2, pad=0)
                size //= 2
            else:
                size *= 2
                total += _conv(size, c, c)
    return total, size


def flops_per_example(cfg: ConfigDict) -> float:
    """Forward FLOPs of one image through encode and decode (``__call__``) for ``cfg`` =
    ``config.model``: convolutions (2 x C_in x C_out per output pixel and kernel tap inside the
    image) and the mid blocks' attention projections and score / value products; norms and
    activations are not counted."""
    v = cfg.vae
    ch, z = tuple(v.block_out_channels), v.latent_channels
    s, c_img = cfg.image_size, cfg.num_channels
    down, small = _levels(s, ch, v.layers_per_block, "down")
    encoder = _conv(s, c_img, ch[0]) + down + _mid(small, ch[-1], v.mid_attention)
    encoder += _conv(small, ch[-1], 2 * z) + _conv(small, 2 * z, 2 * z, 1)
    rev = ch[::-1]
    up, _ = _levels(small, rev, v.layers_per_block + 1, "up")
    decoder = _conv(small, z, z, 1) + _conv(small, z, rev[0]) + _mid(small, rev[0], v.mid_attention)
    return encoder + decoder + up + _conv(s, rev[-1], c_img)
