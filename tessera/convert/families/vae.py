"""diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE, ``_class_name: "AutoencoderKL"``) <->
tessera's ``model.name="vae"`` (``tessera/models/vae.py`` lists the parameter tree, whose paths
are diffusers' names with ``/``).

What diffusers' AutoencoderKL is and tessera implements: plain ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` levels, SiLU, GroupNorm eps 1e-6, ``quant_conv`` and ``post_quant_conv``,
in_channels = out_channels. Anything else (other block types or activations, no quant convs) is
refused with a ConversionError naming the key. ``shift_factor`` null (SD's) is 0;
``latents_mean`` / ``latents_std`` (a pipeline's per-channel latent normalisation, not the
model's math) are dropped with a warning. ``force_upcast`` is not read (export keeps a source
config's value).

The rules cover up to ``MAX_LEVELS`` levels of ``MAX_BLOCKS`` ResNet blocks; the ones a model
lacks are skipped (``convert/params.py: plan``), and a checkpoint tensor no rule reads is an
error. Attention tensors use today's names (``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``);
checkpoints saved with the deprecated ``query`` / ``key`` / ``value`` / ``proj_attn`` names
must be re-saved by diffusers first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.families.diffusers_parts import SameChannels, square_sample_size
from tessera.convert.mapping import (
    CONV2D,
    LINEAR,
    Dropped,
    Family,
    Field,
    Require,
    Rule,
    Set,
    Transform,
    register,
)

MAX_LEVELS, MAX_BLOCKS = 6, 6
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"


def _pair(hf: str, ours: str, weight: str, transform: Transform | None = None) -> list[Rule]:
    """``hf.weight`` -> ``ours/<weight>`` (through ``transform``), ``hf.bias`` -> ``ours/bias``."""
    first = Rule(f"{hf}.weight", f"{ours}/{weight}", *(() if transform is None else (transform,)))
    return [first, Rule(f"{hf}.bias", f"{ours}/bias")]


def _norm(hf: str, ours: str) -> list[Rule]:
    return _pair(hf, ours, "scale")


def _conv(hf: str, ours: str) -> list[Rule]:
    return _pair(hf, ours, "kernel", CONV2D)


def _resnet(hf: str, ours: str) -> list[Rule]:
    return [
        *_norm(f"{hf}.norm1", f"{ours}/norm1"),
        *_conv(f"{hf}.conv1", f"{ours}/conv1"),
        *_norm(f"{hf}.norm2", f"{ours}/norm2"),
        *_conv(f"{hf}.conv2", f"{ours}/conv2"),
        *_conv(f"{hf}.conv_shortcut", f"{ours}/conv_shortcut"),
    ]


def _coder(side: str, levels: str, resampler: str) -> list[Rule]:
    """The rules of ``encoder`` or ``decoder``: its levels (``down_blocks`` / ``up_blocks``,
    resampling conv ``downsamplers`` / ``upsamplers``), mid block and in / out layers."""
    rules = [*_conv(f"{side}.conv_in", f"{side}/conv_in")]
    for i in range(MAX_LEVELS):
        hf, ours = f"{side}.{levels}.{i}", f"{side}/{levels}/{i}"
        for j in range(MAX_BLOCKS):
            rules += _resnet(f"{hf}.resnets.{j}", f"{ours}/resnets/{j}")
        rules += _conv(f"{hf}.{resampler}.0.conv", f"{ours}/resample/conv")
    mid, ours = f"{side}.mid_block", f"{side}/mid_block"
    for j in range(2):
        rules += _resnet(f"{mid}.resnets.{j}", f"{ours}/resnets/{j}")
    attn, ours = f"{mid}.attentions.0", f"{ours}/attention"
    rules += _norm(f"{attn}.group_norm", f"{ours}/group_norm")
    for name in ("to_q", "to_k", "to_v"):
        rules += _pair(f"{attn}.{name}", f"{ours}/attn/{name}", "kernel", LINEAR)
    rules += _pair(f"{attn}.to_out.0", f"{ours}/attn/to_out", "kernel", LINEAR)
    rules += _norm(f"{side}.conv_norm_out", f"{side}/norm_out")
    return rules + _conv(f"{side}.conv_out", f"{side}/conv_out")


RULES = (
    *_coder("encoder", "down_blocks", "downsamplers"),
    *_conv("quant_conv", "quant_conv"),
    *_conv("post_quant_conv", "post_quant_conv"),
    *_coder("decoder", "up_blocks", "upsamplers"),
)


class Levels:
    """``block_out_channels`` <-> ``vae.block_out_channels``; ``down_block_types`` /
    ``up_block_types`` must be one plain encoder / decoder block per level."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        channels = tuple(int(c) for c in hf.get("block_out_channels", (64,)))
        for key, want in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = tuple(hf.get(key, (want,)))
            if types != (want,) * len(channels):
                raise ConversionError(
                    f"config.json {key}={list(types)} is not supported (tessera implements "
                    f"{want} at each of the {len(channels)} levels of block_out_channels)"
                )
        if len(channels) > MAX_LEVELS:
            raise ConversionError(
                f"config.json block_out_channels has {len(channels)} levels; at most "
                f"{MAX_LEVELS} are supported"
            )
        return {"vae.block_out_channels": channels}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        channels = [int(c) for c in model.vae.block_out_channels]
        return {
            "block_out_channels": channels,
            "down_block_types": [DOWN_BLOCK] * len(channels),
            "up_block_types": [UP_BLOCK] * len(channels),
        }


def _blocks_to_ours(count: Any) -> int:
    if int(count) + 1 > MAX_BLOCKS:
        raise ConversionError(
            f"config.json layers_per_block={count} is not supported (at most {MAX_BLOCKS - 1})"
        )
    return int(count)


register(
    Family(
        model_type="AutoencoderKL",
        architecture="",
        config=(
            Levels(),
            Field("layers_per_block", "vae.layers_per_block", 1, _blocks_to_ours),
            Field("latent_channels", "vae.latent_channels", 4),
            Field("norm_num_groups", "vae.norm_groups", 32),
            Field("mid_block_add_attention", "vae.mid_attention", True),
            Field("scaling_factor", "vae.scaling_factor", 0.18215, float),
            Field("shift_factor", "vae.shift_factor", 0.0, float, lambda v: v or None),
            Field("sample_size", "image_size", 32, square_sample_size),
            SameChannels(3, "VAE"),
            Require("act_fn", "silu"),
            Require("use_quant_conv", True),
            Require("use_post_quant_conv", True),
            Dropped("latents_mean", None, "tessera normalises latents by scaling_factor and "
                    "shift_factor only"),
            Dropped("latents_std", None, "tessera normalises latents by scaling_factor and "
                    "shift_factor only"),
            Set(name="vae", **{"vae.norm_eps": 1e-6}),
        ),
        rules=RULES,
        packaged="vae",
        tokenizer=False,
        diffusers=True,
    )
)
