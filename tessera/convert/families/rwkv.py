"""RWKV-6 "Finch" and RWKV-7 "Goose" as flash-linear-attention saves them
(``RWKV6ForCausalLM`` / ``RWKV7ForCausalLM``, ``model_type`` "rwkv6" / "rwkv7", fla 0.6.0).

Both are attention-free stacks of ``LayerNorm -> time mix -> residual -> LayerNorm -> channel
mix -> residual`` with LayerNorms that have biases, a LayerNorm on the embeddings (fla's
``layers.0.pre_norm``, ln0: tessera's ``model.embed_norm``) and, by default, an untied head. The
parameter layouts and the math are listed in the mixers' docstrings
(``tessera/layers/mixers/rwkv6.py``, ``rwkv7.py``) and in tools/make_fla_golden.py, which writes
the golden fixtures.

fla's ``fuse_norm`` selects fused kernels with the same math, except RWKV-7's key normalisation
``kk``: fused (the default) divides by sqrt(sum kk^2 + 1e-6), unfused by max(|kk|, 1e-12);
tessera implements the unfused form (a relative difference below 1e-6 for keys of any useful
size). A checkpoint with ``attn`` (fla's hybrid attention layers), ``hidden_act`` other than
sqrelu, LayerNorms without bias, or (RWKV-7) a value width other than ``hidden_size`` is refused.
fla's first RWKV-7 layer has no value-residual LoRA (``attn.v_lora``): tessera's first layer (a
prefix block) keeps an unused one, which import fills with zeros and export leaves out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.mapping import (
    LINEAR,
    Family,
    Field,
    LeadingOnes,
    Linear,
    Require,
    Rule,
    Set,
    hf_value,
    register,
)
from tessera.layers.mixers.rwkv7 import lora_ranks

_LAYER = "model.layers.{layer}."
_ATTN = _LAYER + "attn."
_FFN = _LAYER + "ffn."

_COMMON_RULES = (
    Rule("model.embeddings.weight", "embed/embedding"),
    Rule("model.layers.0.pre_norm.weight", "embed_norm/scale"),
    Rule("model.layers.0.pre_norm.bias", "embed_norm/bias"),
    Rule("model.norm.weight", "final_norm/scale"),
    Rule("model.norm.bias", "final_norm/bias"),
    Rule("lm_head.weight", "head/kernel", LINEAR),
    Rule(_LAYER + "attn_norm.weight", "norm1/scale"),
    Rule(_LAYER + "attn_norm.bias", "norm1/bias"),
    Rule(_LAYER + "ffn_norm.weight", "norm2/scale"),
    Rule(_LAYER + "ffn_norm.bias", "norm2/bias"),
)


class FfnWidth:
    """``intermediate_size``, or when it is null fla's rule: int(hidden_size * hidden_ratio)
    rounded up to a multiple of 32 (``hidden_ratio``: 3.5 for RWKV-6, 4 for RWKV-7)."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        size = hf.get("intermediate_size")
        if size is None:
            width = int(hf["hidden_size"] * (hf.get("hidden_ratio") or self.ratio))
            size = 32 * -(-width // 32)
        return {"mlp_dim": int(size)}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {"intermediate_size": int(model.mlp_dim)}


def _common(*, ratio: float) -> tuple:
    """Config parts both families share; defaults are fla's config classes'."""
    return (
        Field("vocab_size", "vocab_size"),
        Field("hidden_size", "d_model"),
        Field("num_hidden_layers", "num_layers"),
        FfnWidth(ratio),
        Field("max_position_embeddings", "max_seq_len", 2048),
        Field("norm_eps", "norm_eps", 1e-5),
        Field("norm_first", "embed_norm", True),
        Field("tie_word_embeddings", "tie_embeddings", False),
        Require("hidden_act", "sqrelu"),
        Require("norm_bias", True),
        Require("attn", None),
        Set(norm="layernorm"),
    )


class Rwkv6Shape:
    """RWKV-6 widths and heads: ``expand_k`` / ``expand_v`` (fla's defaults 0.5 / 1), and
    ``num_heads`` -> ``rwkv6.head_dim`` = value width / heads; the per-head GroupNorm takes
    ``norm_eps`` as fla's does (export requires ``rwkv6.group_norm_eps == norm_eps``)."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        d = int(hf["hidden_size"])
        expand_k, expand_v = float(hf.get("expand_k", 0.5)), float(hf.get("expand_v", 1.0))
        heads = int(hf.get("num_heads", 4))
        key_dim, value_dim = d * expand_k, d * expand_v
        for name, width in (("key", key_dim), ("value", value_dim)):
            if not math.isclose(width, round(width)) or round(width) % heads:
                raise ConversionError(
                    f"hidden_size * expand_{name[0]} = {width:g} is not a multiple of "
                    f"num_heads={heads}"
                )
        return {
            "rwkv6.expand_k": expand_k,
            "rwkv6.expand_v": expand_v,
            "rwkv6.head_dim": round(value_dim) // heads,
            "rwkv6.group_norm_eps": float(hf_value(hf, "norm_eps", 1e-5)),
        }

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        s = model.rwkv6
        if float(s.group_norm_eps) != float(model.norm_eps):
            raise ConversionError(
                f"model.rwkv6.group_norm_eps={s.group_norm_eps} differs from model.norm_eps="
                f"{model.norm_eps}; fla's RWKV-6 uses norm_eps for both"
            )
        return {
            "expand_k": float(s.expand_k),
            "expand_v": float(s.expand_v),
            "num_heads": round(float(s.expand_v) * model.d_model) // int(s.head_dim),
        }


register(
    Family(
        model_type="rwkv6",
        architecture="RWKV6ForCausalLM",
        config=(
            *_common(ratio=3.5),
            Rwkv6Shape(),
            Field("proj_low_rank_dim", "rwkv6.proj_low_rank_dim", 32),
            Field("gate_low_rank_dim", "rwkv6.gate_low_rank_dim", 64),
            Set(pattern=("rwkv6:rwkv6_cmix",), prefix=()),
        ),
        rules=(
            *_COMMON_RULES,
            Rule(_ATTN + "x_proj.0.mu", "mixer/x_mu"),
            Rule(_ATTN + "x_proj.0.linear.weight", "mixer/x_proj_a", LINEAR),
            # [D, 5R] viewed [D, 5, R] by fla <-> [5, R, D]
            Rule(_ATTN + "x_proj.2.weight", "mixer/x_proj_b", Linear(in_dims=2)),
            Rule(_ATTN + "x_bias", "mixer/x_bias"),
            Rule(_ATTN + "r_proj.linear.weight", "mixer/r_proj", LINEAR),
            Rule(_ATTN + "k_proj.linear.weight", "mixer/k_proj", LINEAR),
            Rule(_ATTN + "v_proj.linear.weight", "mixer/v_proj", LINEAR),
            Rule(_ATTN + "g_proj.linear.weight", "mixer/g_proj", LINEAR),
            Rule(_ATTN + "w_proj.linear.lora.0.weight", "mixer/w_lora_a", LINEAR),
            Rule(_ATTN + "w_proj.linear.lora.2.weight", "mixer/w_lora_b", LINEAR),
            Rule(_ATTN + "w_proj.linear.lora.2.bias", "mixer/w_bias"),
            Rule(_ATTN + "bonus", "mixer/bonus"),
            Rule(_ATTN + "g_norm.weight", "mixer/g_norm_weight"),
            Rule(_ATTN + "g_norm.bias", "mixer/g_norm_bias"),
            Rule(_ATTN + "o_proj.weight", "mixer/o_proj", LINEAR),
            Rule(_FFN + "key.mu", "channel/key_mu"),
            Rule(_FFN + "key.linear.weight", "channel/key", LINEAR),
            Rule(_FFN + "value.weight", "channel/value", LINEAR),
            Rule(_FFN + "receptance.mu", "channel/receptance_mu"),
            Rule(_FFN + "receptance.linear.weight", "channel/receptance", LINEAR),
        ),
        ignore=("lm_head.weight",),
    )
)


# fla's RWKV7Attention ranks when the config has null: (c, LoRA) with rank
# max(32, round(c * sqrt(D) * head_dim / 64 / 32) * 32); the gate's has no head_dim factor.
_FLA_RANKS = {
    "decay_low_rank_dim": (2.5, "w"),
    "a_low_rank_dim": (2.5, "a"),
    "v_low_rank_dim": (1.7, "v"),
    "gate_low_rank_dim": (5.0, "g"),
}
_FLA_RANK_DEFAULTS = {  # RWKV7Config's own defaults
    "decay_low_rank_dim": 64,
    "a_low_rank_dim": 64,
    "v_low_rank_dim": 16,
    "gate_low_rank_dim": 128,
}


class Rwkv7Shape:
    """RWKV-7 heads (``head_dim``, or ``hidden_size / num_heads``), the four LoRA ranks (a null
    one takes fla's width rule) and ``value_dim`` (per layer in fla; tessera: ``hidden_size``
    for every layer)."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        d, layers = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
        head_dim = hf.get("head_dim") or d // int(hf_value(hf, "num_heads"))
        if d % head_dim:
            raise ConversionError(f"hidden_size={d} is not a multiple of head_dim={head_dim}")
        value_dim = hf.get("value_dim")
        if value_dim not in (None, d, [d] * layers):
            raise ConversionError(
                f"config.json value_dim={value_dim!r} is not supported (tessera's RWKV-7 has "
                f"value width hidden_size={d} in every layer)"
            )
        fields: dict[str, Any] = {"head_dim": int(head_dim)}
        for key, (c, _) in _FLA_RANKS.items():
            rank = hf.get(key, _FLA_RANK_DEFAULTS[key])
            if rank is None:
                factor = 1.0 if key == "gate_low_rank_dim" else head_dim / 64
                rank = max(32, int(round(c * d**0.5 * factor / 32) * 32))
            fields[f"rwkv7.{key}"] = int(rank)
        return fields

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        ranks = lora_ranks(model)
        return {
            "head_dim": int(model.head_dim),
            "num_heads": model.d_model // int(model.head_dim),
            "value_dim": [int(model.d_model)] * int(model.num_layers),
            **{key: ranks[lora] for key, (_, lora) in _FLA_RANKS.items()},
        }


def _lora(name: str, *, bias: bool = True, absent: tuple[int, ...] = ()) -> tuple[Rule, ...]:
    """fla's LoRA(x) = lora.2(act(lora.0(x))) <-> {name}_lora_down, _up (and _bias)."""
    hf = _ATTN + f"{name}_lora.lora."
    rules = (
        Rule(hf + "0.weight", f"mixer/{name}_lora_down", LINEAR, absent=absent),
        Rule(hf + "2.weight", f"mixer/{name}_lora_up", LINEAR, absent=absent),
    )
    if bias:
        rules += (Rule(hf + "2.bias", f"mixer/{name}_lora_bias", absent=absent),)
    return rules


register(
    Family(
        model_type="rwkv7",
        architecture="RWKV7ForCausalLM",
        config=(
            *_common(ratio=4),
            Rwkv7Shape(),
            # The first layer is the one without a value residual (it makes v_first): a prefix
            # block, so the scanned layers all read the stream.
            Set(prefix=("rwkv7:rwkv7_cmix",), pattern=("rwkv7:rwkv7_cmix",)),
        ),
        rules=(
            *_COMMON_RULES,
            *(Rule(_ATTN + f"x_{c}", f"mixer/x_{c}", LeadingOnes(2)) for c in "rwkvag"),
            Rule(_ATTN + "k_k", "mixer/k_k"),
            Rule(_ATTN + "k_a", "mixer/k_a"),
            Rule(_ATTN + "r_k", "mixer/r_k"),
            Rule(_ATTN + "r_proj.weight", "mixer/r_proj", LINEAR),
            Rule(_ATTN + "k_proj.weight", "mixer/k_proj", LINEAR),
            Rule(_ATTN + "v_proj.weight", "mixer/v_proj", LINEAR),
            Rule(_ATTN + "o_proj.weight", "mixer/o_proj", LINEAR),
            *_lora("w"),
            *_lora("a"),
            *_lora("v", absent=(0,)),
            *_lora("g", bias=False),
            Rule(_ATTN + "g_norm.weight", "mixer/g_norm_weight"),
            Rule(_ATTN + "g_norm.bias", "mixer/g_norm_bias"),
            Rule(_FFN + "x_k", "channel/x_k"),
            Rule(_FFN + "key.weight", "channel/key", LINEAR),
            Rule(_FFN + "value.weight", "channel/value", LINEAR),
        ),
        ignore=("lm_head.weight",),
    )
)
