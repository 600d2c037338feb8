"""Image-model building blocks shared by the VAE, the U-Net and the DiT: a dense layer with bias
(``Dense``), a 2-D convolution on NHWC feature maps (``Conv2d``), GroupNorm (``GroupNorm``) and
multi-head attention from one feature sequence to another (``CrossAttention``).

Layouts follow Flax / big_vision: feature maps [B, H, W, C], conv kernels HWIO
[kh, kw, C_in, C_out], dense kernels [in, out]. torch's ``Conv2d.weight`` [O, I, kh, kw] is
``kernel.transpose(3, 2, 0, 1)``; ``Linear.weight`` [out, in] is ``kernel.T``.

Logical axes: conv kernels are ``(None, None, "conv_in", "conv_out")`` (``conv_in`` sharded like
``embed`` over fsdp, ``conv_out`` over tensor); dense kernels take the names their caller gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tessera.kernels.attention import attention
from tessera.layers.base import cast, ones, param, zeros
from tessera.sharding import register_logical_rules

LOGICAL_RULES: dict[str, tuple[str, ...]] = {"conv_in": ("fsdp",), "conv_out": ("tensor",)}
register_logical_rules("conv", LOGICAL_RULES)

FEATURE_AXES = ("batch", None, None, None)  # activations [B, H, W, C]


def _fan_in_normal(in_axes: Sequence[int], out_axis: int) -> jax.nn.initializers.Initializer:
    """torch's default conv / linear init scale (kaiming-uniform with a = sqrt(5) has variance
    1 / (3 fan_in)); a normal of the same variance."""
    return jax.nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "truncated_normal", in_axis=tuple(in_axes), out_axis=out_axis
    )


class Dense(nnx.Module):
    """x [..., in] -> [..., out] = x @ kernel + bias, in ``dtype``; ``kernel`` [in, out]
    (logical ``axes``), ``bias`` [out]. ``zero_init``: the kernel (and bias) start at zero
    (DiT's adaLN-Zero and output layers)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None] = ("embed", "mlp"),
        bias: bool = True,
        zero_init: bool = False,
        dtype: str = "float32",
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        self.dtype = jnp.dtype(dtype)
        init = zeros if zero_init else _fan_in_normal((0,), 1)
        self.kernel = param(rngs, init, (in_features, out_features), axes, param_dtype)
        self.bias = param(rngs, zeros, (out_features,), (axes[1],), param_dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), cast(self.kernel, self.dtype))
        return y if self.bias is None else y + cast(self.bias, self.dtype)


class Conv2d(nnx.Module):
    """x [B, H, W, C_in] -> [B, H', W', C_out]: a ``kernel_size`` convolution with ``stride``
    and symmetric zero ``padding`` (pixels per side; default ``kernel_size // 2``: same size at
    stride 1), ``kernel`` [k, k, C_in, C_out], ``bias`` [C_out]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
        zero_init: bool = False,
        dtype: str = "float32",
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        k = kernel_size
        self.stride = stride
        self.padding = k // 2 if padding is None else padding
        self.dtype = jnp.dtype(dtype)
        init = zeros if zero_init else _fan_in_normal((0, 1, 2), 3)
        shape = (k, k, in_channels, out_channels)
        self.kernel = param(rngs, init, shape, (None, None, "conv_in", "conv_out"), param_dtype)
        self.bias = (
            param(rngs, zeros, (out_channels,), ("conv_out",), param_dtype) if bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            cast(self.kernel, self.dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y if self.bias is None else y + cast(self.bias, self.dtype)


class GroupNorm(nnx.Module):
    """torch's ``GroupNorm`` on channels-last input x [B, ..., C]: ``groups`` groups of
    C / groups channels, normalised over the group's channels and every spatial position in
    float32, then the affine ``scale`` / ``bias`` [C]; returns x's dtype."""

    def __init__(
        self,
        channels: int,
        *,
        groups: int = 32,
        eps: float = 1e-6,
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
        self.groups, self.eps = groups, eps
        self.scale = param(rngs, ones, (channels,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros, (channels,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape, c = x.shape, x.shape[-1]
        xf = x.astype(jnp.float32).reshape(shape[0], -1, self.groups, c // self.groups)
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class CrossAttention(nnx.Module):
    """Bidirectional multi-head attention of queries x [B, T, D] over ``context``
    [B, S, D_ctx] (``context=None``: self-attention over x) -> [B, T, D] (diffusers'
    ``Attention``): ``to_q`` [D, H*Dh], ``to_k`` / ``to_v`` [D_ctx, H*Dh] (biases with
    ``qkv_bias``), ``to_out`` [H*Dh, D] with bias; softmax in float32 through
    ``kernels.attention`` (``impl`` as ``model.attention_impl``)."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        impl: str = "auto",
        dtype: str = "float32",
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        self.heads, self.head_dim, self.impl = heads, head_dim, impl
        inner, ctx = heads * head_dim, context_dim or dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = Dense(dim, inner, axes=("embed", "mlp"), bias=qkv_bias, **kw)
        self.to_k = Dense(ctx, inner, axes=("embed", "mlp"), bias=qkv_bias, **kw)
        self.to_v = Dense(ctx, inner, axes=("embed", "mlp"), bias=qkv_bias, **kw)
        self.to_out = Dense(inner, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        b, t, s = x.shape[0], x.shape[1], context.shape[1]
        q = self.to_q(x).reshape(b, t, self.heads, self.head_dim)
        k = self.to_k(context).reshape(b, s, self.heads, self.head_dim)
        v = self.to_v(context).reshape(b, s, self.heads, self.head_dim)
        out = attention(
            q,
            k,
            v,
            impl=self.impl,
            q_positions=jnp.zeros((b, t), jnp.int32),
            kv_positions=jnp.zeros((b, s), jnp.int32),
            causal=False,
        )
        return self.to_out(out.reshape(b, t, -1))
