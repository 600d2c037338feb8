"""DiT denoisers (diffusers' ``DiTTransformer2DModel``, and the hub's older DiT configs whose
``_class_name`` is ``Transformer2DModel`` with ``norm_type="ada_norm_zero"``) <-> tessera's
``model.name="dit"`` (``tessera/models/dit.py`` lists both parameter trees).

What diffusers' DiT is: patched latents with fixed sin-cos positions, adaLN-Zero blocks of
bidirectional attention (biases everywhere) and a tanh-GELU MLP of width 4 x hidden, the class
table with its null-class row and the timestep MLP on 256 sinusoidal features. diffusers keeps a
copy of the conditioning embedder (timestep MLP and class table) in every block and uses block
0's; tessera has one, so an import requires the copies to be equal (as in the hub's checkpoints,
converted from the original one-embedder code) and an export writes it into every block.

Config keys: heads x head width <-> ``num_heads`` / ``head_dim`` (``d_model`` their product,
``mlp_dim`` 4 x that), ``in_channels`` <-> ``num_channels``, ``out_channels`` (C or 2 C) <->
``dit.learn_sigma``, ``sample_size`` <-> ``image_size``, ``num_embeds_ada_norm`` <->
``num_classes``, ``norm_eps`` <-> ``norm_eps`` (the LayerNorm before the MLP). Other settings
must have DiT's values (``Fixed``); a ``Transformer2DModel`` that is not a DiT is refused first.
Both classes read their own defaults for missing keys. An import starts from the base config
(the diffusion training config is the caller's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.mapping import (
    CONV2D,
    FLAT,
    LINEAR,
    ConfigPart,
    Dropped,
    Family,
    Field,
    Linear,
    Rule,
    Set,
    hf_value,
    register,
)

_LAYER = "transformer_blocks.{layer}."
_EMBED = _LAYER + "norm1.emb."

RULES = (
    Rule("pos_embed.proj.weight", "patch_embed/kernel", CONV2D),
    Rule("pos_embed.proj.bias", "patch_embed/bias"),
    Rule(_EMBED + "timestep_embedder.linear_1.weight", "t_embedder/linear_1/kernel", LINEAR,
         tied=True),
    Rule(_EMBED + "timestep_embedder.linear_1.bias", "t_embedder/linear_1/bias", tied=True),
    Rule(_EMBED + "timestep_embedder.linear_2.weight", "t_embedder/linear_2/kernel", LINEAR,
         tied=True),
    Rule(_EMBED + "timestep_embedder.linear_2.bias", "t_embedder/linear_2/bias", tied=True),
    Rule(_EMBED + "class_embedder.embedding_table.weight", "label_embedding", tied=True),
    Rule(_LAYER + "norm1.linear.weight", "adaln/kernel", LINEAR),
    Rule(_LAYER + "norm1.linear.bias", "adaln/bias"),
    Rule(_LAYER + "attn1.to_q.weight", "attention/wq", LINEAR),
    Rule(_LAYER + "attn1.to_k.weight", "attention/wk", LINEAR),
    Rule(_LAYER + "attn1.to_v.weight", "attention/wv", LINEAR),
    Rule(_LAYER + "attn1.to_q.bias", "attention/bq", FLAT),
    Rule(_LAYER + "attn1.to_k.bias", "attention/bk", FLAT),
    Rule(_LAYER + "attn1.to_v.bias", "attention/bv", FLAT),
    Rule(_LAYER + "attn1.to_out.0.weight", "attention/wo", Linear(in_dims=2)),
    Rule(_LAYER + "attn1.to_out.0.bias", "attention/bo"),
    Rule(_LAYER + "ff.net.0.proj.weight", "mlp/wi", LINEAR),
    Rule(_LAYER + "ff.net.0.proj.bias", "mlp/bi"),
    Rule(_LAYER + "ff.net.2.weight", "mlp/wo", LINEAR),
    Rule(_LAYER + "ff.net.2.bias", "mlp/bo"),
    Rule("proj_out_1.weight", "final_adaln/kernel", LINEAR),
    Rule("proj_out_1.bias", "final_adaln/bias"),
    Rule("proj_out_2.weight", "proj_out/kernel", LINEAR),
    Rule("proj_out_2.bias", "proj_out/bias"),
)

FF_MULT = 4  # diffusers' FeedForward width: 4 x hidden (DiT passes no ff_inner_dim)
TIMESTEP_FEATURES = 256  # diffusers' CombinedTimestepLabelEmbeddings: Timesteps(256)


@dataclasses.dataclass(frozen=True)
class Fixed:
    """An HF key whose value must be ``value`` (a missing key takes the class's ``default``)."""

    hf: str
    value: Any
    default: Any

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        got = hf.get(self.hf, self.default)
        if got != self.value:
            raise ConversionError(
                f"config.json {self.hf}={got!r} is not supported (tessera's DiT implements "
                f"{self.hf}={self.value!r})"
            )
        return {}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {self.hf: self.value}


@dataclasses.dataclass(frozen=True)
class Width:
    """``num_attention_heads`` x ``attention_head_dim`` <-> ``num_heads`` (= ``num_kv_heads``),
    ``head_dim``, ``d_model`` (their product) and ``mlp_dim`` (4 x ``d_model``)."""

    heads: int
    head_dim: int

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        h = int(hf_value(hf, "num_attention_heads", self.heads))
        dh = int(hf_value(hf, "attention_head_dim", self.head_dim))
        return {"num_heads": h, "num_kv_heads": h, "head_dim": dh, "d_model": h * dh,
                "mlp_dim": FF_MULT * h * dh}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        h, dh, d = model.num_heads, model.head_dim, model.d_model
        if h * dh != d:
            raise ConversionError(f"model.num_heads={h} x model.head_dim={dh} != "
                                  f"model.d_model={d} has no equivalent in diffusers' DiT")
        if model.mlp_dim != FF_MULT * d:
            raise ConversionError(f"model.mlp_dim={model.mlp_dim} has no equivalent in diffusers' "
                                  f"DiT (it needs {FF_MULT} x model.d_model = {FF_MULT * d})")
        return {"num_attention_heads": int(h), "attention_head_dim": int(dh)}


@dataclasses.dataclass(frozen=True)
class Channels:
    """``in_channels`` <-> ``num_channels``; ``out_channels`` (missing or null: in_channels;
    twice it: the learned variance) <-> ``dit.learn_sigma``."""

    default: int | None

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        c = int(hf_value(hf, "in_channels", self.default))
        out = hf.get("out_channels") or c
        if out not in (c, 2 * c):
            raise ConversionError(f"config.json out_channels={out} is not supported (tessera's "
                                  f"DiT outputs in_channels={c} or, learning sigma, {2 * c})")
        return {"num_channels": c, "dit.learn_sigma": out == 2 * c}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        c = int(model.num_channels)
        return {"in_channels": c, "out_channels": c * (2 if model.dit.learn_sigma else 1)}


class DiTVariant:
    """A ``Transformer2DModel`` imports only as a DiT: adaLN-Zero over patched continuous
    input, without cross-attention, with positions at their trained scale."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        norm = hf.get("norm_type", "layer_norm")
        missing = [k for k in ("in_channels", "patch_size", "sample_size", "num_embeds_ada_norm")
                   if hf.get(k) is None]
        if norm != "ada_norm_zero" or missing or hf.get("num_vector_embeds") is not None:
            raise ConversionError(
                f"Transformer2DModel with norm_type={norm!r}"
                + (f" and no {', '.join(missing)}" if missing else "")
                + " is not a DiT (tessera imports it only as one: norm_type='ada_norm_zero' over "
                "patched continuous input, num_embeds_ada_norm classes)"
            )
        scale = hf.get("interpolation_scale") or max(int(hf["sample_size"]) // 64, 1)
        if scale != 1:
            raise ConversionError(f"config.json interpolation_scale={scale} is not supported "
                                  "(tessera's DiT positions are the grid's, scale 1)")
        return {}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {"interpolation_scale": 1}


def dit_config(defaults: Mapping[str, Any]) -> tuple[ConfigPart, ...]:
    """The config parts of a DiT class whose missing keys mean ``defaults``."""
    return (
        Width(defaults["num_attention_heads"], defaults["attention_head_dim"]),
        Channels(defaults["in_channels"]),
        Field("num_layers", "num_layers", defaults["num_layers"]),
        Field("sample_size", "image_size", defaults["sample_size"]),
        Field("patch_size", "patch_size", defaults["patch_size"]),
        Field("num_embeds_ada_norm", "num_classes", defaults["num_embeds_ada_norm"]),
        Field("norm_eps", "norm_eps", 1e-5),
        Fixed("norm_type", "ada_norm_zero", defaults["norm_type"]),
        Fixed("activation_fn", "gelu-approximate", defaults["activation_fn"]),
        Fixed("attention_bias", True, defaults["attention_bias"]),
        Fixed("norm_elementwise_affine", False, defaults["norm_elementwise_affine"]),
        Dropped("dropout", 0.0, "tessera's DiT has no dropout (training only)"),
        Set(name="dit", pattern=("attention:mlp",), prefix=(),
            **{"dit.freq_dim": TIMESTEP_FEATURES}),
    )


DIT_DEFAULTS = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, num_layers=28, sample_size=32,
    patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False,
)
TRANSFORMER_2D_DEFAULTS = dict(
    num_attention_heads=16, attention_head_dim=88, in_channels=None, num_layers=1,
    sample_size=None, patch_size=None, num_embeds_ada_norm=None, norm_type="layer_norm",
    activation_fn="geglu", attention_bias=False, norm_elementwise_affine=True,
)
# Transformer2DModel features a DiT does not have (cross-attention, PixArt's caption input).
TRANSFORMER_2D_ONLY = (
    Fixed("cross_attention_dim", None, None),
    Fixed("only_cross_attention", False, False),
    Fixed("double_self_attention", False, False),
    Fixed("attention_type", "default", "default"),
    Fixed("caption_channels", None, None),
)

register(
    Family(
        model_type="DiTTransformer2DModel",
        architecture="",
        config=dit_config(DIT_DEFAULTS),
        rules=RULES,
        tokenizer=False,
        diffusers=True,
        packaged="ldm",  # an import trains (task diffusion) and samples like ldm's presets
    )
)
register(
    Family(
        model_type="Transformer2DModel",
        architecture="",
        config=(DiTVariant(), *dit_config(TRANSFORMER_2D_DEFAULTS), *TRANSFORMER_2D_ONLY),
        rules=RULES,
        tokenizer=False,
        diffusers=True,
        packaged="ldm",  # an import trains (task diffusion) and samples like ldm's presets
    )
)
