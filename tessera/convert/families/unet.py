"""diffusers' ``UNet2DConditionModel`` (Stable Diffusion's denoiser, ``_class_name:
"UNet2DConditionModel"``) <-> tessera's ``model.name="unet"`` (``tessera/models/unet.py`` lists
the parameter tree, whose paths are diffusers' names with ``/``).

What tessera implements: ``CrossAttnDownBlock2D`` / ``DownBlock2D`` levels mirrored by
``CrossAttnUpBlock2D`` / ``UpBlock2D`` ones (``attention_levels``), the
``UNetMidBlock2DCrossAttn`` middle, positional timestep features, text conditioning through
``encoder_hidden_states`` (tessera's ``context``), in_channels = out_channels. Class / addition
embeddings, timestep conditioning projections, dual or cross-only attention, other block,
timestep or ResNet variants change the math and are refused with a ConversionError naming the
key; so are per-level ``layers_per_block`` / ``transformer_layers_per_block`` /
``cross_attention_dim`` lists whose entries differ. ``upcast_attention`` is not read (tessera's
softmax is float32 already; export keeps a source config's value); ``dropout`` is dropped.

Heads: diffusers' SD configs keep the number of heads per level in ``attention_head_dim`` with
``num_attention_heads`` null (diffusers refuses the latter); import reads heads from
``num_attention_heads`` when set, else ``attention_head_dim``; export writes
``attention_head_dim``.

An import starts from the packaged ``ldm`` config (task ``diffusion``, its data and optimizer;
training and ``tessera.serve.sample`` need class labels, ``model.num_classes > 0``: SD's
text-conditioned U-Nets import for their forward only). The rules cover ``MAX_LEVELS`` levels of
``MAX_LAYERS`` layers (+ 1 on the way up) with ``MAX_TRANSFORMER_LAYERS`` transformer layers;
the ones a model lacks are skipped (``convert/params.py: plan``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.families.diffusers_parts import SameChannels, square_sample_size
from tessera.convert.mapping import (
    CONV2D,
    IDENTITY,
    LINEAR,
    Dropped,
    Family,
    Field,
    Finish,
    Index,
    Require,
    Rule,
    Set,
    Shape,
    Transform,
    register,
)

MAX_LEVELS, MAX_LAYERS, MAX_TRANSFORMER_LAYERS = 6, 4, 4
DOWN, CROSS_DOWN = "DownBlock2D", "CrossAttnDownBlock2D"
UP, CROSS_UP = "UpBlock2D", "CrossAttnUpBlock2D"


@dataclasses.dataclass(frozen=True)
class Projection:
    """``proj_in`` / ``proj_out``: a ``Linear`` [out, in] <-> dense kernel [in, out]
    (``use_linear_projection``) or a 1x1 ``Conv2d`` [out, in, 1, 1] <-> conv kernel
    [1, 1, in, out]; which one by the tessera kernel's rank."""

    @staticmethod
    def _pick(ndim: int) -> Transform:
        return LINEAR if ndim == 2 else CONV2D

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        return self._pick(len(shapes[0])).hf_shape(shapes)

    def to_ours(self, x: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        return self._pick(len(shapes[0])).to_ours(x, shapes)

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return self._pick(xs[0].ndim).to_hf(xs)

    def region(self, shapes: Sequence[Shape], k: int, index: Index) -> tuple[Index, Finish]:
        return self._pick(len(shapes[0])).region(shapes, k, index)


def _pair(hf: str, ours: str, weight: str, transform: Transform = IDENTITY) -> list[Rule]:
    """``hf.weight`` -> ``ours/<weight>`` (through ``transform``), ``hf.bias`` -> ``ours/bias``."""
    return [Rule(f"{hf}.weight", f"{ours}/{weight}", transform), Rule(f"{hf}.bias", f"{ours}/bias")]


def _norm(hf: str, ours: str) -> list[Rule]:
    return _pair(hf, ours, "scale")


def _conv(hf: str, ours: str) -> list[Rule]:
    return _pair(hf, ours, "kernel", CONV2D)


def _dense(hf: str, ours: str) -> list[Rule]:
    return _pair(hf, ours, "kernel", LINEAR)


def _resnet(hf: str, ours: str) -> list[Rule]:
    return [
        *_norm(f"{hf}.norm1", f"{ours}/norm1"),
        *_conv(f"{hf}.conv1", f"{ours}/conv1"),
        *_dense(f"{hf}.time_emb_proj", f"{ours}/time_emb_proj"),
        *_norm(f"{hf}.norm2", f"{ours}/norm2"),
        *_conv(f"{hf}.conv2", f"{ours}/conv2"),
        *_conv(f"{hf}.conv_shortcut", f"{ours}/conv_shortcut"),
    ]


def _transformer(hf: str, ours: str) -> list[Rule]:
    """A ``Transformer2DModel`` and its ``BasicTransformerBlock``s."""
    rules = [
        *_norm(f"{hf}.norm", f"{ours}/norm"),
        *_pair(f"{hf}.proj_in", f"{ours}/proj_in", "kernel", Projection()),
        *_pair(f"{hf}.proj_out", f"{ours}/proj_out", "kernel", Projection()),
    ]
    for k in range(MAX_TRANSFORMER_LAYERS):
        block, mine = f"{hf}.transformer_blocks.{k}", f"{ours}/transformer_blocks/{k}"
        for norm in ("norm1", "norm2", "norm3"):
            rules += _norm(f"{block}.{norm}", f"{mine}/{norm}")
        for attn in ("attn1", "attn2"):
            rules += [
                Rule(f"{block}.{attn}.{p}.weight", f"{mine}/{attn}/{p}/kernel", LINEAR)
                for p in ("to_q", "to_k", "to_v")
            ]
            rules += _dense(f"{block}.{attn}.to_out.0", f"{mine}/{attn}/to_out")
        rules += _dense(f"{block}.ff.net.0.proj", f"{mine}/ff/proj")
        rules += _dense(f"{block}.ff.net.2", f"{mine}/ff/out")
    return rules


def _level(hf: str, ours: str, resnets: int, resampler: str) -> list[Rule]:
    rules = []
    for j in range(resnets):
        rules += _resnet(f"{hf}.resnets.{j}", f"{ours}/resnets/{j}")
        rules += _transformer(f"{hf}.attentions.{j}", f"{ours}/attentions/{j}")
    return rules + _conv(f"{hf}.{resampler}.0.conv", f"{ours}/resample/conv")


RULES = (
    *_conv("conv_in", "conv_in"),
    *_dense("time_embedding.linear_1", "time_embedding/linear_1"),
    *_dense("time_embedding.linear_2", "time_embedding/linear_2"),
    *(r for i in range(MAX_LEVELS)
      for r in _level(f"down_blocks.{i}", f"down_blocks/{i}", MAX_LAYERS, "downsamplers")),
    *(r for j in range(2) for r in _resnet(f"mid_block.resnets.{j}", f"mid_block/resnets/{j}")),
    *_transformer("mid_block.attentions.0", "mid_block/attentions/0"),
    *(r for i in range(MAX_LEVELS)
      for r in _level(f"up_blocks.{i}", f"up_blocks/{i}", MAX_LAYERS + 1, "upsamplers")),
    *_norm("conv_norm_out", "conv_norm_out"),
    *_conv("conv_out", "conv_out"),
)


def _per_level(hf: Mapping[str, Any], key: str, default: Any, levels: int) -> tuple[int, ...]:
    """diffusers' int-or-list settings as one int per level."""
    value = hf.get(key)
    value = default if value is None else value
    values = tuple(value) if isinstance(value, list | tuple) else (value,) * levels
    if len(values) != levels or not all(isinstance(v, int) for v in values):
        raise ConversionError(
            f"config.json {key}={value!r} is not an int or a list of {levels} ints (one per level)"
        )
    return values


def _uniform(hf: Mapping[str, Any], key: str, default: Any, levels: int, limit: int) -> int:
    """A per-level setting tessera keeps as one int: every level's must agree."""
    values = _per_level(hf, key, default, levels)
    if len(set(values)) != 1:
        raise ConversionError(
            f"config.json {key}={list(values)} is not supported (tessera uses one value for "
            "every level)"
        )
    if not 1 <= values[0] <= limit:
        raise ConversionError(f"config.json {key}={values[0]} is not supported (1 .. {limit})")
    return values[0]


class Structure:
    """``block_out_channels``, ``down_block_types`` / ``up_block_types`` / ``mid_block_type``,
    ``layers_per_block``, heads (module docstring), ``transformer_layers_per_block`` and
    ``cross_attention_dim`` <-> ``model.unet``'s block_out_channels, attention_levels,
    layers_per_block, num_attention_heads, transformer_layers, cross_attention_dim."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        chans = tuple(int(c) for c in hf.get("block_out_channels", (320, 640, 1280, 1280)))
        n = len(chans)
        if not 1 <= n <= MAX_LEVELS:
            raise ConversionError(
                f"config.json block_out_channels has {n} levels; 1 .. {MAX_LEVELS} are supported"
            )
        down = tuple(hf.get("down_block_types", (CROSS_DOWN,) * 3 + (DOWN,)))
        up = tuple(hf.get("up_block_types", (UP,) + (CROSS_UP,) * 3))
        if len(down) != n or any(b not in (DOWN, CROSS_DOWN) for b in down):
            raise ConversionError(
                f"config.json down_block_types={list(down)} is not supported (tessera "
                f"implements {DOWN} or {CROSS_DOWN} at each of the {n} levels)"
            )
        attend = tuple(b == CROSS_DOWN for b in down)
        mirrored = tuple(CROSS_UP if a else UP for a in reversed(attend))
        if up != mirrored:
            raise ConversionError(
                f"config.json up_block_types={list(up)} is not supported (tessera mirrors "
                f"down_block_types: {list(mirrored)})"
            )
        heads_key = "num_attention_heads" if hf.get("num_attention_heads") else (
            "attention_head_dim")
        return {
            "unet.block_out_channels": chans,
            "unet.attention_levels": attend,
            "unet.layers_per_block": _uniform(hf, "layers_per_block", 2, n, MAX_LAYERS),
            "unet.num_attention_heads": _per_level(hf, heads_key, 8, n),
            "unet.transformer_layers": _uniform(
                hf, "transformer_layers_per_block", 1, n, MAX_TRANSFORMER_LAYERS),
            "unet.cross_attention_dim": _uniform(hf, "cross_attention_dim", 1280, n, 1 << 30),
        }

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        u = model.unet
        attend = tuple(bool(a) for a in u.attention_levels)
        return {
            "block_out_channels": [int(c) for c in u.block_out_channels],
            "down_block_types": [CROSS_DOWN if a else DOWN for a in attend],
            "up_block_types": [CROSS_UP if a else UP for a in reversed(attend)],
            "layers_per_block": int(u.layers_per_block),
            "attention_head_dim": [int(h) for h in u.num_attention_heads],
            "num_attention_heads": None,
            "transformer_layers_per_block": int(u.transformer_layers),
            "cross_attention_dim": int(u.cross_attention_dim),
        }


# diffusers settings whose other values change the math; the value tessera implements.
REQUIRED = dict(
    mid_block_type="UNetMidBlock2DCrossAttn", center_input_sample=False, act_fn="silu",
    class_embed_type=None, num_class_embeds=None, addition_embed_type=None,
    time_cond_proj_dim=None, dual_cross_attention=False, only_cross_attention=False,
    encoder_hid_dim=None, encoder_hid_dim_type=None, resnet_time_scale_shift="default",
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type="positional",
    time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None,
    conv_in_kernel=3, conv_out_kernel=3, attention_type="default", class_embeddings_concat=False,
    cross_attention_norm=None, downsample_padding=1, mid_block_scale_factor=1,
    reverse_transformer_layers_per_block=None,
)

register(
    Family(
        model_type="UNet2DConditionModel",
        architecture="",
        config=(
            Structure(),
            SameChannels(4, "U-Net"),
            Field("sample_size", "image_size", 64, square_sample_size),
            Field("use_linear_projection", "unet.use_linear_projection", False),
            Field("norm_num_groups", "unet.norm_groups", 32),
            Field("norm_eps", "unet.norm_eps", 1e-5, float),
            Field("flip_sin_to_cos", "unet.flip_sin_to_cos", True),
            Field("freq_shift", "unet.freq_shift", 0),
            *(Require(key, value) for key, value in REQUIRED.items()),
            Dropped("dropout", 0.0, "tessera's U-Net has no dropout (training only)"),
            Set(name="unet", num_classes=0),
        ),
        rules=RULES,
        packaged="ldm",
        tokenizer=False,
        diffusers=True,
    )
)
