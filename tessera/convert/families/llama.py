"""Llama-style GQA decoders: Llama 1/2/3, Mistral (sliding window), Qwen2 (qkv bias), Qwen3
(q/k norm). One tensor table serves all four: a rule applies when the config has its parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.families.rope import Rope
from tessera.convert.mapping import (
    FLAT,
    LINEAR,
    Family,
    Field,
    Linear,
    Require,
    Rule,
    Set,
    register,
)
from tessera.models.layout import compress_layers, parse_layout

_LAYER = "model.layers.{layer}."

RULES = (
    Rule("model.embed_tokens.weight", "embed/embedding"),
    Rule("model.norm.weight", "final_norm/scale"),
    Rule("lm_head.weight", "head/kernel", LINEAR),
    Rule(_LAYER + "input_layernorm.weight", "norm1/scale"),
    Rule(_LAYER + "self_attn.q_proj.weight", "mixer/wq", LINEAR),
    Rule(_LAYER + "self_attn.k_proj.weight", "mixer/wk", LINEAR),
    Rule(_LAYER + "self_attn.v_proj.weight", "mixer/wv", LINEAR),
    Rule(_LAYER + "self_attn.o_proj.weight", "mixer/wo", Linear(in_dims=2)),
    Rule(_LAYER + "self_attn.q_proj.bias", "mixer/bq", FLAT),
    Rule(_LAYER + "self_attn.k_proj.bias", "mixer/bk", FLAT),
    Rule(_LAYER + "self_attn.v_proj.bias", "mixer/bv", FLAT),
    Rule(_LAYER + "self_attn.q_norm.weight", "mixer/q_norm/scale"),
    Rule(_LAYER + "self_attn.k_norm.weight", "mixer/k_norm/scale"),
    Rule(_LAYER + "post_attention_layernorm.weight", "norm2/scale"),
    Rule(_LAYER + "mlp.gate_proj.weight", "channel/wi_gate", LINEAR),
    Rule(_LAYER + "mlp.up_proj.weight", "channel/wi_up", LINEAR),
    Rule(_LAYER + "mlp.down_proj.weight", "channel/wo", LINEAR),
)

# Tied checkpoints may still store lm_head (transformers ties it to the embedding on load).
IGNORE = ("lm_head.weight", "*.rotary_emb.inv_freq")


def decoder(
    *, max_position: int, head_dim: Any = None, layout: bool = True, mlp: bool = True
) -> tuple:
    """Config parts every Llama-style GQA family shares (also the MoE ones, ``families/moe.py``,
    with ``mlp=False``: their ``intermediate_size`` is not the dense MLP's); defaults are the HF
    config classes' own."""
    return (
        Field("vocab_size", "vocab_size"),
        Field("hidden_size", "d_model"),
        Field("num_hidden_layers", "num_layers"),
        Field("num_attention_heads", "num_heads"),
        Field("num_key_value_heads", "num_kv_heads", lambda hf: hf["num_attention_heads"]),
        Field(
            "head_dim",
            "head_dim",
            head_dim or (lambda hf: hf["hidden_size"] // hf["num_attention_heads"]),
        ),
        *((Field("intermediate_size", "mlp_dim"),) if mlp else ()),
        Field("max_position_embeddings", "max_seq_len", max_position),
        Field("rms_norm_eps", "norm_eps", 1e-6),
        Field("tie_word_embeddings", "tie_embeddings", False),
        Require("hidden_act", "silu"),
        Rope(),
        *((Set(pattern=("attention:mlp",), prefix=()),) if layout else ()),
    )


class QwenWindow:
    """Qwen2/3 sliding window: ``use_sliding_window``, ``sliding_window``, ``max_window_layers``
    or transformers 5's ``layer_types``. One window for every layer is ``model.sliding_window``;
    a mix of full and sliding layers becomes per-block settings in the layout (the first
    ``max_window_layers`` full layers as a prefix, the sliding ones as the scanned unit)."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        layers = int(hf["num_hidden_layers"])
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        types = hf.get("layer_types") or [
            "sliding_attention"
            if window is not None and i >= hf.get("max_window_layers", 28)
            else "full_attention"
            for i in range(layers)
        ]
        if len(types) != layers:
            raise ConversionError(
                f"layer_types has {len(types)} entries for num_hidden_layers={layers}"
            )
        windows = [int(window or 0) if t == "sliding_attention" else 0 for t in types]
        if len(set(windows)) == 1:
            return {"sliding_window": windows[0], "prefix": (), "pattern": ("attention:mlp",)}
        entries = [
            "attention:mlp" + (f" sliding_window={w}" if w else "") for w in windows
        ]
        prefix, pattern = compress_layers(entries)
        return {"sliding_window": 0, "prefix": prefix, "pattern": pattern}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        windows = []
        for i, spec in enumerate(parse_layout(model).layers()):
            block = spec.config(model)
            if (spec.mixer, spec.channel) != ("attention", "mlp"):
                raise ConversionError(
                    f"layer {i} is {spec}; this Hugging Face family has only attention:mlp blocks"
                )
            if float(block.rope_theta) != float(model.rope_theta):
                raise ConversionError(
                    f"layer {i} sets rope_theta={block.rope_theta}; this Hugging Face family has "
                    "one RoPE theta for every layer"
                )
            windows.append(int(block.sliding_window))
        sizes = sorted(set(windows) - {0})
        if len(sizes) > 1:
            raise ConversionError(
                f"layers use sliding windows {sizes}; this Hugging Face family has one window size"
            )
        window = sizes[0] if sizes else 0
        leading_full = next((i for i, w in enumerate(windows) if w), len(windows))
        return {
            "use_sliding_window": bool(window),
            "sliding_window": window or None,
            "max_window_layers": leading_full,
            "layer_types": ["sliding_attention" if w else "full_attention" for w in windows],
        }


register(
    Family(
        model_type="llama",
        architecture="LlamaForCausalLM",
        config=(
            *decoder(max_position=2048),
            Require("attention_bias", False),
            Require("mlp_bias", False),
            Set(qkv_bias=False, qk_norm=False, sliding_window=0),
        ),
        rules=RULES,
        ignore=IGNORE,
    )
)

register(
    Family(
        model_type="mistral",
        architecture="MistralForCausalLM",
        config=(
            *decoder(max_position=4096 * 32),
            Field(
                "sliding_window",
                "sliding_window",
                4096,
                to_ours=lambda v: int(v or 0),
                to_theirs=lambda v: int(v) or None,
                keep_null=True,
            ),
            Set(qkv_bias=False, qk_norm=False),
        ),
        rules=RULES,
        ignore=IGNORE,
    )
)

register(
    Family(
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        config=(
            *decoder(max_position=32768, layout=False),
            QwenWindow(),
            Set(qkv_bias=True, qk_norm=False),
        ),
        rules=RULES,
        ignore=IGNORE,
    )
)

register(
    Family(
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        config=(
            *decoder(max_position=32768, head_dim=128, layout=False),
            Require("attention_bias", False),
            QwenWindow(),
            Set(qkv_bias=False, qk_norm=True),
        ),
        rules=RULES,
        ignore=IGNORE,
    )
)
