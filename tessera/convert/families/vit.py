"""ViT image classifiers (``ViTForImageClassification``, ``model_type: "vit"``) <-> tessera's
``model.name="vit"`` (``tessera/models/vit.py`` lists both parameter trees).

What HF ViT is: class-token pooling, a learned position table (class token first), pre-norm
LayerNorm blocks with bidirectional attention and a GELU MLP, every bias (q/k/v ones optional:
``qkv_bias``). A tessera config with anything else (``pool`` map / gap, ``sincos2d`` positions,
rmsnorm, swiglu, missing biases) is refused at export, naming the setting.

An import starts from the packaged ``vit`` config (task ``classify``, its data source and
optimizer). Class names: HF ``id2label`` becomes ``model.class_names`` (by index; HF's
``LABEL_<i>`` names when the config has none), stored in the workdir's ``config.json`` with the
rest of the config; export writes ``id2label`` / ``label2id`` back from it. Images: tessera
takes [B, H, W, C] where HF takes ``pixel_values`` [B, C, H, W], both already normalised
(HF's processor: ``x / 127.5 - 1``, as tessera's image pipeline).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.mapping import (
    CONV2D,
    FLAT,
    LINEAR,
    Dropped,
    Family,
    Field,
    LeadingOnes,
    Linear,
    Rule,
    Set,
    register,
)

_LAYER = "vit.encoder.layer.{layer}."

RULES = (
    Rule("vit.embeddings.patch_embeddings.projection.weight", "patch_embed/kernel", CONV2D),
    Rule("vit.embeddings.patch_embeddings.projection.bias", "patch_embed/bias"),
    Rule("vit.embeddings.cls_token", "cls_token", LeadingOnes(2)),
    Rule("vit.embeddings.position_embeddings", "pos_embedding", LeadingOnes(1)),
    Rule(_LAYER + "layernorm_before.weight", "norm1/scale"),
    Rule(_LAYER + "layernorm_before.bias", "norm1/bias"),
    Rule(_LAYER + "attention.attention.query.weight", "mixer/wq", LINEAR),
    Rule(_LAYER + "attention.attention.key.weight", "mixer/wk", LINEAR),
    Rule(_LAYER + "attention.attention.value.weight", "mixer/wv", LINEAR),
    Rule(_LAYER + "attention.attention.query.bias", "mixer/bq", FLAT),
    Rule(_LAYER + "attention.attention.key.bias", "mixer/bk", FLAT),
    Rule(_LAYER + "attention.attention.value.bias", "mixer/bv", FLAT),
    Rule(_LAYER + "attention.output.dense.weight", "mixer/wo", Linear(in_dims=2)),
    Rule(_LAYER + "attention.output.dense.bias", "mixer/bo"),
    Rule(_LAYER + "layernorm_after.weight", "norm2/scale"),
    Rule(_LAYER + "layernorm_after.bias", "norm2/bias"),
    Rule(_LAYER + "intermediate.dense.weight", "channel/wi", LINEAR),
    Rule(_LAYER + "intermediate.dense.bias", "channel/bi"),
    Rule(_LAYER + "output.dense.weight", "channel/wo", LINEAR),
    Rule(_LAYER + "output.dense.bias", "channel/bo"),
    Rule("vit.layernorm.weight", "final_norm/scale"),
    Rule("vit.layernorm.bias", "final_norm/bias"),
    Rule("classifier.weight", "head/kernel", LINEAR),
    Rule("classifier.bias", "head/bias"),
)

# HF hidden_act -> model.mlp_activation; export writes the first name of each.
ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def activation_to_ours(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConversionError(
            f"config.json hidden_act={name!r} is not supported (tessera implements "
            f"{', '.join(ACTIVATIONS)})"
        )
    return ACTIVATIONS[name]


def activation_to_hf(name: str) -> str:
    theirs = next((k for k, v in ACTIVATIONS.items() if v == name), None)
    if theirs is None:
        raise ConversionError(
            f"model.mlp_activation={name!r} has no equivalent in this Hugging Face family "
            f"(it needs one of {', '.join(sorted(set(ACTIVATIONS.values())))})"
        )
    return theirs


class Heads:
    """``num_attention_heads`` -> ``num_heads`` = ``num_kv_heads`` (no grouped queries) and
    ``head_dim`` = hidden_size / heads; export refuses anything else."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        heads, width = int(hf["num_attention_heads"]), int(hf["hidden_size"])
        if width % heads:
            raise ConversionError(
                f"hidden_size={width} is not divisible by num_attention_heads={heads}"
            )
        return {"num_heads": heads, "num_kv_heads": heads, "head_dim": width // heads}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        if model.num_kv_heads != model.num_heads:
            raise ConversionError(
                f"model.num_kv_heads={model.num_kv_heads} != model.num_heads={model.num_heads} "
                "has no equivalent in this Hugging Face family (no grouped-query attention)"
            )
        if model.num_heads * model.head_dim != model.d_model:
            raise ConversionError(
                f"model.head_dim={model.head_dim} x model.num_heads={model.num_heads} != "
                f"model.d_model={model.d_model} has no equivalent in this Hugging Face family"
            )
        return {"num_attention_heads": int(model.num_heads)}


class Labels:
    """``id2label`` (or ``num_labels``; HF's default: 2 classes) <-> ``num_classes`` and
    ``class_names``; export writes ``id2label`` and ``label2id``, with HF's ``LABEL_<i>`` for a
    model without names."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        id2label = hf.get("id2label")
        if id2label is None:
            count = int(hf.get("num_labels", 2))
            return {"num_classes": count, "class_names": default_names(count)}
        try:
            by_id = {int(k): str(v) for k, v in id2label.items()}
        except (AttributeError, ValueError):
            raise ConversionError(
                "config.json id2label is not a map of class ids to names"
            ) from None
        if sorted(by_id) != list(range(len(by_id))) or not by_id:
            raise ConversionError(
                f"config.json id2label has ids {sorted(by_id)}; expected 0 .. K - 1"
            )
        return {"num_classes": len(by_id), "class_names": tuple(by_id[i] for i in sorted(by_id))}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        names = tuple(model.class_names) or default_names(model.num_classes)
        if len(names) != model.num_classes:
            raise ConversionError(
                f"model.class_names has {len(names)} names for model.num_classes="
                f"{model.num_classes}"
            )
        return {
            "id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)},
        }


def default_names(count: int) -> tuple[str, ...]:
    """HF's names for classes without any (``PretrainedConfig``'s ``LABEL_<i>``)."""
    return tuple(f"LABEL_{i}" for i in range(count))


register(
    Family(
        model_type="vit",
        architecture="ViTForImageClassification",
        config=(
            Field("hidden_size", "d_model"),
            Field("num_hidden_layers", "num_layers"),
            Heads(),
            Field("intermediate_size", "mlp_dim"),
            Field("hidden_act", "mlp_activation", "gelu", activation_to_ours, activation_to_hf),
            Field("layer_norm_eps", "norm_eps", 1e-12),
            Field("image_size", "image_size", 224),
            Field("patch_size", "patch_size", 16),
            Field("num_channels", "num_channels", 3),
            Field("qkv_bias", "qkv_bias", True),
            Field("hidden_dropout_prob", "dropout", 0.0),
            Dropped(
                "attention_probs_dropout_prob",
                0.0,
                "tessera has no dropout on attention probabilities (training only)",
            ),
            Labels(),
            Set(
                name="vit",
                pattern=("attention:mlp",),
                prefix=(),
                pool="cls",
                pos_embedding="learned",
                norm="layernorm",
                causal=False,
                rope=False,
                qk_norm=False,
                sliding_window=0,
                attn_out_bias=True,
                mlp_bias=True,
            ),
        ),
        rules=RULES,
        packaged="vit",
        tokenizer=False,
    )
)
