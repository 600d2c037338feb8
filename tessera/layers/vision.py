"""Vision layers: patch embedding, fixed 2-D sin-cos position embeddings and multihead attention
pooling (MAP), for the ViT (``models/vit.py``); the DiT (``models/dit.py``) shares the first two.

Logical axis names only vision uses, replicated by default: ``patch`` (a patch's pixel rows and
columns), ``channels`` (image channels), ``position`` (patch / token positions of a learned
position table).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.layers.base import cast, normal, param, zeros
from tessera.layers.mixers import Attention
from tessera.layers.mlp import MLP
from tessera.layers.norms import make_norm
from tessera.sharding import constrain, register_logical_rules

LOGICAL_RULES: dict[str, tuple[str, ...]] = {"patch": (), "channels": (), "position": ()}
register_logical_rules("vision", LOGICAL_RULES)


class PatchEmbed(nnx.Module):
    """images [B, H, W, C] -> patch vectors [B, N, D], N = (H / p) * (W / p) in row-major order
    (patch (i, j) is token i * W / p + j): a p x p convolution with stride p, as a reshape and
    one einsum.

    ``kernel`` [p, p, C, D] is a conv kernel in HWIO layout (Flax / big_vision); torch's
    ``Conv2d`` weight [D, C, p, p] (OIHW, HF ViT's ``patch_embeddings.projection``) is
    ``kernel.transpose(3, 2, 0, 1)`` and back ``weight.transpose(2, 3, 1, 0)``. ``bias`` [D].
    The kernel starts lecun-normal (std 1 / sqrt(p * p * C), big_vision's conv init), so patch
    vectors start at the scale of sin-cos positions rather than far below it.
    """

    def __init__(
        self, patch_size: int, channels: int, dim: int, *, dtype: str, param_dtype: str,
        rngs: nnx.Rngs,
    ):
        p = patch_size
        self.patch_size = p
        self.dtype = jnp.dtype(dtype)
        axes = ("patch", "patch", "channels", "embed")
        init = jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = param(rngs, init, (p, p, channels, dim), axes, param_dtype)
        self.bias = param(rngs, zeros, (dim,), ("embed",), param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.patch_size
        x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum("bypxqc,pqcd->byxd", x, cast(self.kernel, self.dtype))
        x = x.reshape(b, (h // p) * (w // p), -1) + cast(self.bias, self.dtype)
        return constrain(x, ("batch", "length", "act_embed"))


def sincos_2d(
    height: int, width: int, dim: int, temperature: float = 10_000.0, *, endpoint: bool = True
) -> np.ndarray:
    """Fixed position embeddings float32 [height * width, dim] of a row-major grid (big_vision's
    ``posemb_sincos_2d``): features are ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` for column x
    and row y, over dim / 4 frequencies ``w_k = temperature ** (-k / (dim / 4 - 1))``.
    ``endpoint=False``: ``w_k = temperature ** (-k / (dim / 4))`` (MAE's and diffusers'
    ``get_2d_sincos_pos_embed``, which DiT uses; same feature order)."""
    if dim % 4 or dim < 8:
        raise ValueError(f"sin-cos 2-D position embeddings need d_model a multiple of 4 >= 8, "
                         f"got {dim}")
    quarter = dim // 4
    omega = temperature ** -(np.arange(quarter, dtype=np.float64) / (quarter - int(endpoint)))
    rows, cols = np.mgrid[:height, :width]
    x = cols.reshape(-1, 1) * omega
    y = rows.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class MAPHead(nnx.Module):
    """Multihead attention pooling (big_vision's ``MAPHead``): a learned ``probe`` [D] attends
    over the tokens with the model's attention (``attention``: its q/k/v/o parameters and
    biases), then a pre-norm MLP with a residual (``norm``, ``mlp``). [B, T, D] -> [B, D]."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.probe = param(rngs, normal(cfg.init_std), (cfg.d_model,), ("embed",), cfg.param_dtype)
        self.attention = Attention(cfg, rngs=rngs)
        self.norm = make_norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, d = x.shape
        probe = jnp.broadcast_to(cast(self.probe, self.dtype), (b, 1, d))
        y = self.attention.cross(probe, x)
        y = y + self.mlp(self.norm(y))[0]
        return y[:, 0]
