"""Vision Transformer: ``model.name = "vit"``.

``ViT(cfg, rngs=)``; ``model(images [B, H, W, C] float, *, rng=None, train=False) ->
ModelOutput`` with logits [B, num_classes] float32 and the blocks' aux. Images are cut into
``patch_size`` patches (``layers/vision.py: PatchEmbed``), given a class token (``pool="cls"``)
and position embeddings, run through the same block stack as the LM (``models/stack.py``:
pre-norm ``attention:mlp`` blocks, scanned, remat policies, aux), final-normed, pooled
(class token, multihead attention pooling or the mean of the patches) and classified by a dense
head with bias (kernel zero-initialised with ``model.head_zeroinit``). The vit configs set
``causal=False`` (bidirectional), ``rope=False``, ``norm="layernorm"``, ``mlp_activation="gelu"``
and every bias.

Positions: ``learned`` is a table over the tokens, the class token first (HF ViT's
[1, N + 1, D] without its batch axis); ``sincos2d`` is fixed (big_vision's
``posemb_sincos_2d``), added to the patches only, not to the class token.

Training noise (``train=True``): ``rng`` is split into an embedding key (dropout on the embedded
tokens) and the blocks' key (one ``fold_in`` per layer: dropout on the attention and MLP outputs,
stochastic depth; see ``models/stack.py``). ``train=False`` ignores ``rng``; ``train=True`` with
a positive ``model.dropout`` or ``model.stochastic_depth`` and no rng is an error.

Parameter tree (N = (image_size / patch_size)^2 patches, T = N + 1 tokens with the class token,
p = patch_size, C = num_channels, D = d_model, H = num_heads, Dh = head_dim, F = mlp_dim,
K = num_classes; scanned stacks have a leading axis of num_layers on every ``units`` leaf,
``units/<layer>/blocks/0/...`` unrolled)::

    patch_embed/kernel         [p, p, C, D]   HF conv weight [D, C, p, p] = .transpose(3, 2, 0, 1)
    patch_embed/bias           [D]
    cls_token                  [D]            pool="cls" only (HF cls_token [1, 1, D])
    pos_embedding              [T or N, D]    pos_embedding="learned" only (T with the class token)
    units/blocks/0/norm1/scale, bias             [D]           HF layernorm_before
    units/blocks/0/mixer/wq, wk, wv              [D, H, Dh]    HF attention.query/key/value
    units/blocks/0/mixer/bq, bk, bv              [H, Dh]         (weight [H*Dh, D], bias [H*Dh])
    units/blocks/0/mixer/wo                      [H, Dh, D]    HF attention.output.dense
    units/blocks/0/mixer/bo                      [D]
    units/blocks/0/norm2/scale, bias             [D]           HF layernorm_after
    units/blocks/0/channel/wi, bi                [D, F], [F]   HF intermediate.dense
    units/blocks/0/channel/wo, bo                [F, D], [D]   HF output.dense
    final_norm/scale, bias     [D]            HF vit.layernorm
    map_head/probe             [D]            pool="map" only: the learned query, and
    map_head/attention/...     as units/blocks/0/mixer (no layers axis)
    map_head/norm/scale, bias  [D]
    map_head/mlp/wi, bi, wo, bo
    head/kernel, bias          [D, K], [K]    HF classifier (weight [K, D])

(norms without ``bias`` and MLPs with ``wi_gate``/``wi_up`` under ``norm="rmsnorm"`` /
``mlp_activation="swiglu"``; biases only where ``qkv_bias``, ``attn_out_bias``, ``mlp_bias``.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.layers.base import cast, normal, param, zeros
from tessera.layers.dropout import dropout
from tessera.layers.embeddings import ClassHead
from tessera.layers.mixers import SeqInfo
from tessera.layers.norms import make_norm
from tessera.layers.vision import MAPHead, PatchEmbed, sincos_2d
from tessera.models.lm import ModelOutput
from tessera.models.stack import BlockStack
from tessera.sharding import constrain

POOLS = ("cls", "map", "gap")
POS_EMBEDDINGS = ("learned", "sincos2d")


def _check_config(cfg: ConfigDict) -> None:
    """One-line ValueErrors for vit settings that cannot work."""
    if cfg.image_size <= 0 or cfg.patch_size <= 0 or cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"model.image_size={cfg.image_size} is not divisible by "
            f"model.patch_size={cfg.patch_size}"
        )
    if cfg.pool not in POOLS:
        raise ValueError(f"model.pool: unknown pooling {cfg.pool!r}; known: {', '.join(POOLS)}")
    if cfg.pos_embedding not in POS_EMBEDDINGS:
        raise ValueError(f"model.pos_embedding: unknown {cfg.pos_embedding!r}; known: "
                         f"{', '.join(POS_EMBEDDINGS)}")
    if cfg.num_classes <= 0:
        raise ValueError(f"vit needs model.num_classes > 0, got {cfg.num_classes}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"model.dropout={cfg.dropout} is not in [0, 1)")
    if not 0 <= cfg.stochastic_depth <= 1:
        raise ValueError(f"model.stochastic_depth={cfg.stochastic_depth} is not in [0, 1]")


class ViT(BlockStack):
    """Vision Transformer classifier (see the module docstring)."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # later edits of the caller's config stay out
        _check_config(cfg)
        self.cfg = cfg
        d, pd = cfg.d_model, cfg.param_dtype
        self.grid = cfg.image_size // cfg.patch_size
        if cfg.pos_embedding == "sincos2d":
            sincos_2d(self.grid, self.grid, d)  # its errors at construction
        self.patch_embed = PatchEmbed(
            cfg.patch_size,
            cfg.num_channels,
            d,
            dtype=cfg.dtype,
            param_dtype=pd,
            rngs=rngs,
        )
        cls = cfg.pool == "cls"
        self.cls_token = param(rngs, zeros, (d,), ("embed",), pd) if cls else None
        shape, axes = (self.grid**2 + int(cls), d), ("position", "embed")
        learned = cfg.pos_embedding == "learned"
        self.pos_embedding = (
            param(rngs, normal(cfg.init_std), shape, axes, pd) if learned else None
        )
        self._init_stack(cfg, rngs)
        self.final_norm = make_norm(cfg, rngs=rngs)
        self.map_head = MAPHead(cfg, rngs=rngs) if cfg.pool == "map" else None
        self.head = ClassHead(
            d,
            cfg.num_classes,
            init_std=0.0 if cfg.head_zeroinit else cfg.init_std,
            param_dtype=pd,
            bias=True,
            rngs=rngs,
        )

    def _check_images(self, images: jax.Array) -> None:
        s, c = self.cfg.image_size, self.cfg.num_channels
        if images.ndim != 4 or images.shape[1:] != (s, s, c):
            raise ValueError(
                f"vit expects images [batch, {s}, {s}, {c}] (model.image_size, "
                f"model.num_channels); got shape {tuple(images.shape)}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"vit expects float images (scaled pixels); got {images.dtype}")

    def _training_rng(self, rng: jax.Array | None, train: bool) -> jax.Array | None:
        """The key training noise draws from; None when not training or nothing is random."""
        if not train or (self.cfg.dropout == 0 and self.cfg.stochastic_depth == 0):
            return None
        if rng is None:
            raise ValueError(
                f"vit train=True with model.dropout={self.cfg.dropout}, "
                f"model.stochastic_depth={self.cfg.stochastic_depth} needs an rng"
            )
        return rng

    def embed(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> tokens [B, T, D]: patches, class token, positions."""
        x = self.patch_embed(images)
        if self.cfg.pos_embedding == "sincos2d":
            x = x + jnp.asarray(sincos_2d(self.grid, self.grid, x.shape[-1]), x.dtype)
        if self.cls_token is not None:
            b, _, d = x.shape
            cls = jnp.broadcast_to(cast(self.cls_token, x.dtype), (b, 1, d))
            x = jnp.concatenate([cls, x], axis=1)
        if self.pos_embedding is not None:
            x = x + cast(self.pos_embedding, x.dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def __call__(
        self, images: jax.Array, *, rng: jax.Array | None = None, train: bool = False
    ) -> ModelOutput:
        """images float [B, image_size, image_size, num_channels] -> ModelOutput (logits [B, K]
        float32, aux). ``rng``: the training key, read only with ``train=True``."""
        self._check_images(images)
        rng = self._training_rng(rng, train)
        x = self.embed(images)
        if rng is not None:
            embed_key, rng = jax.random.split(rng)
            x = dropout(x, self.cfg.dropout, embed_key)
        b, t, _ = x.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        info = SeqInfo(positions, jnp.ones((b, t), jnp.int32))
        x, _, _, aux = self._run_blocks(x, info, None, rng)
        x = self.final_norm(x)
        if self.cfg.pool == "cls":
            pooled = x[:, 0]
        elif self.cfg.pool == "map":
            pooled = self.map_head(x)
        else:
            pooled = jnp.mean(x.astype(jnp.float32), axis=1)
        return ModelOutput(logits=self.head(pooled), aux=aux)
