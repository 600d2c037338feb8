"""RetNet as flash-linear-attention saves it (``RetNetForCausalLM``, ``model_type`` "retnet",
fla 0.6.0): blocks ``RMSNorm -> multi-scale retention -> residual -> RMSNorm -> SwiGLU MLP ->
residual``, final RMSNorm, untied head by default. The retention layout and math are in
``tessera/layers/mixers/retention.py`` and tools/make_fla_golden.py.

What is refused: grouped k/v heads (``num_kv_heads`` < ``num_heads``), a ``feature_map``, no
output gate, a non-affine or unfused gated norm (``fuse_norm`` false names the norm ``g_norm``),
fla's attention-residual blocks (``attnres_block_size``), hybrid attention layers (``attn``) and
an MLP activation other than swish. fla's RetNet ignores ``use_short_conv`` (its block never
passes it to the layer), so tessera does too. Rotary: base 10000 (fla's fixed default), so
export needs ``model.rope_theta`` 10000.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict
from tessera.configs.retnet import fla_mlp_dim
from tessera.convert.errors import ConversionError
from tessera.convert.mapping import (
    LINEAR,
    Family,
    Field,
    Linear,
    Require,
    Rule,
    Set,
    register,
)

_LAYER = "model.layers.{layer}."
_ATTN = _LAYER + "attn."


class MlpWidth:
    """``intermediate_size``, or when it is null fla's GatedMLP rule (``fla_mlp_dim`` with
    ``hidden_ratio``, default 2)."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        size = hf.get("intermediate_size")
        if size is None:
            size = fla_mlp_dim(int(hf["hidden_size"]), hf.get("hidden_ratio") or 2)
        return {"mlp_dim": int(size)}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {"intermediate_size": int(model.mlp_dim)}


class KvHeads:
    """``num_kv_heads`` must be null or ``num_heads``: tessera's retention has one k/v head per
    query head."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        kv, heads = hf.get("num_kv_heads"), hf.get("num_heads", 8)
        if kv not in (None, heads):
            raise ConversionError(
                f"config.json num_kv_heads={kv} is not supported (tessera's retention has "
                f"num_kv_heads = num_heads = {heads})"
            )
        return {}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {"num_kv_heads": None}


register(
    Family(
        model_type="retnet",
        architecture="RetNetForCausalLM",
        config=(
            Field("vocab_size", "vocab_size"),
            Field("hidden_size", "d_model"),
            Field("num_hidden_layers", "num_layers"),
            Field("num_heads", "num_heads", 8),
            KvHeads(),
            Field("expand_k", "retention.expand_k", 1.0, to_ours=float),
            Field("expand_v", "retention.expand_v", 2.0, to_ours=float),
            MlpWidth(),
            Field("max_position_embeddings", "max_seq_len", 2048),
            Field("norm_eps", "norm_eps", 1e-6),
            Field("tie_word_embeddings", "tie_embeddings", False),
            Require("hidden_act", "swish"),
            Require("feature_map", None),
            Require("use_output_gate", True),
            Require("elementwise_affine", True),
            Require("fuse_norm", True),
            Require("attnres_block_size", None),
            Require("attn", None),
            Set(
                norm="rmsnorm",
                mlp_activation="swiglu",
                mlp_bias=False,
                embed_norm=False,
                rope_theta=10000.0,
                pattern=("retention:mlp",),
                prefix=(),
            ),
        ),
        rules=(
            Rule("model.embeddings.weight", "embed/embedding"),
            Rule("model.norm.weight", "final_norm/scale"),
            Rule("lm_head.weight", "head/kernel", LINEAR),
            Rule(_LAYER + "attn_norm.weight", "norm1/scale"),
            Rule(_ATTN + "q_proj.weight", "mixer/q_proj", LINEAR),
            Rule(_ATTN + "k_proj.weight", "mixer/k_proj", LINEAR),
            Rule(_ATTN + "v_proj.weight", "mixer/v_proj", LINEAR),
            Rule(_ATTN + "g_proj.weight", "mixer/g_proj", LINEAR),
            Rule(_ATTN + "g_norm_swish_gate.weight", "mixer/g_norm_weight"),
            Rule(_ATTN + "o_proj.weight", "mixer/o_proj", Linear(in_dims=2)),
            Rule(_LAYER + "mlp_norm.weight", "norm2/scale"),
            Rule(_LAYER + "mlp.gate_proj.weight", "channel/wi_gate", LINEAR),
            Rule(_LAYER + "mlp.up_proj.weight", "channel/wi_up", LINEAR),
            Rule(_LAYER + "mlp.down_proj.weight", "channel/wo", LINEAR),
        ),
        ignore=("lm_head.weight",),
    )
)
