"""The latent-diffusion U-Net denoiser: ``model.name = "unet"``, Stable Diffusion's
``UNet2DConditionModel`` in diffusers' layout and math (blocks in ``models/unet_blocks.py``).

``UNet(cfg, rngs=)``; ``model(x [B, H, W, C] float, t [B] (int or float timesteps), *,
labels=None, context=None, rng=None, train=False) -> float32 [B, H, W, C]``: the noise (or v, or
x0: the task's ``model.diffusion.prediction``) at timesteps t. C = ``model.num_channels`` in and
out; H and W are multiples of 2 ** (levels - 1) (``model.image_size`` sizes the FLOP count; the
network is convolutional, so other sizes run too).

Conditioning is a sequence the transformer blocks cross-attend to: ``context`` [B, S,
cross_attention_dim] (text encoder states: diffusers' ``encoder_hidden_states``), or class
``labels`` int [B] when ``model.num_classes > 0``: row ``labels`` of the model's ``class_embed``
[num_classes + 1, cross_attention_dim] as a one-token context (row num_classes is the null class
of classifier-free guidance; a label past it makes that example's output NaN, ``jnp.take``'s
fill mode, and a negative one counts from the end). The U-Net has no dropout: ``rng`` and
``train`` are accepted for the denoisers' shared interface and unused.

Structure (L = len(block_out_channels) levels, c_i their channels, n = layers_per_block):
``conv_in``; timestep features (c_0 wide) -> ``time_embedding`` (4 c_0, fed to every resnet);
down level i: n resnets, each followed by a Transformer2D where ``attention_levels[i]``, and a
stride-2 conv except on the last level; the middle: resnet, Transformer2D, resnet; up level i
(reversed): n + 1 resnets, each taking the last skip (every down output, conv_in's included)
concatenated to its input, transformers as on the way down, a 2x upsample except on the last
level; ``conv_norm_out``, SiLU, ``conv_out``. ``model.remat`` other than ``none`` recomputes each
resnet and each Transformer2D in the backward pass under that policy.

Parameter tree (diffusers' names with ``/`` for ``.``, ``kernel`` / ``scale`` for ``weight``;
i, j, k indices as there)::

    conv_in/kernel, bias                   [3, 3, C, c_0], [c_0]
    time_embedding/linear_1, linear_2      /kernel [c_0, 4 c_0], [4 c_0, 4 c_0], /bias
    class_embed                            [num_classes + 1, D_ctx]   (num_classes > 0 only)
    down_blocks/i/resnets/j/               norm1, conv1, time_emb_proj, norm2, conv2,
                                           conv_shortcut (when channels change)
    down_blocks/i/attentions/j/            norm, proj_in, transformer_blocks/k/{norm1, attn1,
                                           norm2, attn2, norm3, ff/proj, ff/out}, proj_out
        attn{1,2}/to_q, to_k, to_v/kernel  [c, c] (attn2's to_k, to_v: [D_ctx, c]); no biases
        attn{1,2}/to_out/kernel, bias      [c, c], [c]            (diffusers' to_out.0)
        ff/proj, ff/out                    [c, 8 c], [4 c, c]     (diffusers' ff.net.0.proj,
                                                                   ff.net.2)
        proj_in, proj_out/kernel           [c, c] (use_linear_projection) or [1, 1, c, c]
    down_blocks/i/resample/conv            stride-2 3x3 conv       (diffusers' downsamplers.0)
    mid_block/resnets/{0,1}, mid_block/attentions/0
    up_blocks/i/resnets/j, attentions/j    as down_blocks, j < n + 1
    up_blocks/i/resample/conv              3x3 conv after the 2x  (diffusers' upsamplers.0)
    conv_norm_out/scale, bias              [c_0]
    conv_out/kernel, bias                  [3, 3, c_0, C], [C]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.layers.base import normal, param
from tessera.layers.conv import FEATURE_AXES, Conv2d, GroupNorm
from tessera.layers.diffusion import TimestepMLP, indexed, listed, timestep_embedding
from tessera.models.remat import remat_policy
from tessera.models.unet_blocks import FF_MULT, Level, UNetLevel, UNetMid
from tessera.sharding import constrain

TEMB_MULT = 4  # time embedding width: TEMB_MULT x block_out_channels[0]


def _check_config(cfg: ConfigDict) -> None:
    """One-line ValueErrors for unet settings that cannot work."""
    u = cfg.unet
    chans = tuple(u.block_out_channels)
    if not chans:
        raise ValueError("model.unet.block_out_channels is empty")
    for key in ("attention_levels", "num_attention_heads"):
        if len(u[key]) != len(chans):
            raise ValueError(
                f"model.unet.{key} has {len(u[key])} entries for {len(chans)} levels "
                f"(model.unet.block_out_channels={chans})"
            )
    for c in chans:
        if c % u.norm_groups:
            raise ValueError(
                f"model.unet.block_out_channels={chans}: {c} channels do not split into "
                f"model.unet.norm_groups={u.norm_groups} groups"
            )
    attending = [i for i, a in enumerate(u.attention_levels) if a] + [len(chans) - 1]  # + mid
    for i in attending:
        heads = u.num_attention_heads[i]
        if heads <= 0 or chans[i] % heads:
            raise ValueError(
                f"model.unet.num_attention_heads[{i}]={heads} does not divide "
                f"block_out_channels[{i}]={chans[i]}"
            )
    factor = 2 ** (len(chans) - 1)
    if cfg.image_size <= 0 or cfg.image_size % factor:
        raise ValueError(
            f"model.image_size={cfg.image_size} is not divisible by 2 ** (levels - 1) = {factor}"
        )
    for key in ("layers_per_block", "transformer_layers"):
        if u[key] < 1:
            raise ValueError(f"model.unet.{key}={u[key]} must be at least 1")
    if cfg.num_classes < 0:
        raise ValueError(f"model.num_classes={cfg.num_classes} is negative")
    remat_policy(cfg.get("remat", "none"))  # an unknown policy name is an error now


def plan(cfg: ConfigDict) -> tuple[list[Level], Level, list[Level]]:
    """(down levels, middle, up levels) of the model config ``cfg``: what the model builds and
    the FLOP count walks. The up path's skip channels come from the down path's outputs."""
    u = cfg.unet
    chans, heads, n = tuple(u.block_out_channels), tuple(u.num_attention_heads), u.layers_per_block
    last = len(chans) - 1
    skips, down, c = [chans[0]], [], chans[0]  # conv_in's output is the first skip
    for i, out in enumerate(chans):
        resnets = tuple((c if j == 0 else out, out) for j in range(n))
        attend = n if u.attention_levels[i] else 0
        down.append(Level(resnets, attend, heads[i], i < last, 2**i))
        skips += [out] * (n + int(i < last))
        c = out
    mid = Level(((c, c), (c, c)), 1, heads[-1], False, 2**last)
    up = []
    for i in reversed(range(len(chans))):
        out = chans[i]
        resnets = []
        for _ in range(n + 1):
            resnets.append((c + skips.pop(), out))
            c = out
        attend = n + 1 if u.attention_levels[i] else 0
        up.append(Level(tuple(resnets), attend, heads[i], i > 0, 2**i))
    return down, mid, up


class UNet(nnx.Module):
    """Stable Diffusion's U-Net denoiser (see the module docstring)."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # later edits of the caller's config stay out
        _check_config(cfg)
        self.cfg = cfg
        u, c0 = cfg.unet, cfg.unet.block_out_channels[0]
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        temb = TEMB_MULT * c0
        self.conv_in = Conv2d(cfg.num_channels, c0, 3, **kw)
        self.time_embedding = TimestepMLP(c0, temb, **kw)
        self.class_embed = (
            param(rngs, normal(1.0), (cfg.num_classes + 1, u.cross_attention_dim),
                  (None, "embed"), cfg.param_dtype)
            if cfg.num_classes > 0 else None
        )
        down, mid, up = plan(cfg)
        self.down_blocks = indexed(
            UNetLevel(lv, cfg, up=False, temb_dim=temb, rngs=rngs) for lv in down
        )
        self.mid_block = UNetMid(mid, cfg, temb_dim=temb, rngs=rngs)
        self.up_blocks = indexed(UNetLevel(lv, cfg, up=True, temb_dim=temb, rngs=rngs) for lv in up)
        self.conv_norm_out = GroupNorm(
            c0, groups=u.norm_groups, eps=u.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.conv_out = Conv2d(c0, cfg.num_channels, 3, **kw)

    def _check_inputs(self, x: jax.Array, t: jax.Array) -> None:
        c, factor = self.cfg.num_channels, 2 ** (len(self.down_blocks) - 1)
        if x.ndim != 4 or x.shape[-1] != c or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"unet expects x [batch, H, W, {c}] (model.num_channels) with H, W multiples of "
                f"{factor}; got shape {tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"unet expects float x; got {x.dtype}")
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"unet expects timesteps t [{x.shape[0]}] (one per example); got shape "
                f"{tuple(t.shape)}"
            )

    def _context(
        self, batch: int, labels: jax.Array | None, context: jax.Array | None
    ) -> jax.Array:
        """The sequence the transformers attend to: ``context`` as given, or the class
        embeddings of ``labels`` as [B, 1, D_ctx]."""
        dim = self.cfg.unet.cross_attention_dim
        if (labels is None) == (context is None):
            raise ValueError(
                "unet needs exactly one of labels (class-conditioned, model.num_classes > 0) "
                "or context (a [batch, tokens, cross_attention_dim] sequence)"
            )
        if context is not None:
            if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != dim:
                raise ValueError(
                    f"unet expects context [{batch}, tokens, {dim}] (model.unet."
                    f"cross_attention_dim); got shape {tuple(context.shape)}"
                )
            return context
        if self.class_embed is None:
            raise ValueError("unet got labels but has no class embedding (model.num_classes=0)")
        if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"unet expects int labels [{batch}]; got {labels.dtype} {tuple(labels.shape)}"
            )
        return jnp.take(self.class_embed[...], labels, axis=0)[:, None, :]

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        labels: jax.Array | None = None,
        context: jax.Array | None = None,
        rng: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        del rng, train  # no dropout (module docstring)
        t = jnp.asarray(t)
        self._check_inputs(x, t)
        context = self._context(x.shape[0], labels, context)
        u = self.cfg.unet
        features = timestep_embedding(
            t, u.block_out_channels[0], flip_sin_to_cos=u.flip_sin_to_cos,
            freq_shift=u.freq_shift,
        )
        temb = self.time_embedding(features)
        h = constrain(self.conv_in(x), FEATURE_AXES)
        skips = [h]
        for block in listed(self.down_blocks):
            h = block(h, temb, context, skips)
        h = self.mid_block(h, temb, context)
        for block in listed(self.up_blocks):
            h = block(h, temb, context, skips)
        h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
        return h.astype(jnp.float32)


def _conv_flops(size: int, cin: int, cout: int, *, k: int = 3, stride: int = 1) -> int:
    """A k x k conv (padding k // 2) on a size x size input: 2 FLOPs per multiply-add of a
    kernel tap that falls inside the input (XLA's count; taps on the zero padding are left out,
    a few percent at the lowest resolutions)."""
    pad, out = k // 2, (size + 2 * (k // 2) - k) // stride + 1
    taps = sum(min(o * stride - pad + k, size) - max(o * stride - pad, 0) for o in range(out))
    return 2 * taps * taps * cin * cout


def _transformer_flops(
    c: int, pixels: int, cfg: ConfigDict, context_len: int, scores: bool = True
) -> int:
    """One Transformer2D on ``pixels`` tokens of ``c`` channels (``scores=False``: without the
    attention scores and weighted values)."""
    u = cfg.unet
    # multiply-adds: proj_in + proj_out (a dense layer or a 1x1 conv alike); per layer
    # self-attention (q, k, v, out; scores, values), cross-attention (q, out; k, v of the
    # context; scores, values), the GEGLU feed-forward ([c, 2F], [F, c])
    proj = 2 * pixels * c * c
    self_attn = 4 * pixels * c * c + scores * 2 * pixels * pixels * c
    cross_attn = (2 * pixels * c * c + 2 * context_len * u.cross_attention_dim * c
                  + scores * 2 * pixels * context_len * c)
    ff = 3 * pixels * c * FF_MULT * c
    return 2 * (proj + u.transformer_layers * (self_attn + cross_attn + ff))


def _level_flops(
    level: Level, cfg: ConfigDict, context_len: int, *, up: bool, scores: bool = True
) -> int:
    """One level (or the middle) of the U-Net, at its input resolution."""
    size = cfg.image_size // level.factor
    temb = TEMB_MULT * cfg.unet.block_out_channels[0]
    total = 0
    for cin, cout in level.resnets:
        total += _conv_flops(size, cin, cout) + _conv_flops(size, cout, cout) + 2 * temb * cout
        total += _conv_flops(size, cin, cout, k=1) if cin != cout else 0  # the shortcut
    total += level.attentions * _transformer_flops(
        level.channels, size**2, cfg, context_len, scores
    )
    if level.resample:  # stride-2 conv, or a conv after the 2x upsampling
        c = level.channels
        total += _conv_flops(size * 2, c, c) if up else _conv_flops(size, c, c, stride=2)
    return total


def flops_per_example(cfg: ConfigDict, context_len: int, *, scores: bool = True) -> float:
    """Forward FLOPs of one ``model.image_size`` example with a ``context_len``-token context
    (1 for class labels): the convolutions, dense layers and attention scores and values, at 2
    FLOPs per multiply-add (norms, activations and softmax are left out: a few percent at
    SD's widths, more at tiny ones). ``cfg``: the model config. ``scores=False`` leaves out the
    attention scores and weighted values (the count SD 2.1's published 759 G follows, in
    multiply-adds)."""
    _check_config(cfg)
    c0, size = cfg.unet.block_out_channels[0], cfg.image_size
    temb = TEMB_MULT * c0
    total = 2 * _conv_flops(size, cfg.num_channels, c0)  # conv_in and conv_out
    total += 2 * (c0 * temb + temb * temb)  # the timestep MLP
    down, mid, up = plan(cfg)
    total += sum(_level_flops(lv, cfg, context_len, up=False, scores=scores) for lv in down)
    total += _level_flops(mid, cfg, context_len, up=False, scores=scores)
    total += sum(_level_flops(lv, cfg, context_len, up=True, scores=scores) for lv in up)
    return float(total)
