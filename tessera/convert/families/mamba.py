"""Mamba-1 and Mamba-2 (``MambaForCausalLM``, ``Mamba2ForCausalLM``): attention-free stacks of
``norm -> mixer -> residual`` blocks. The tessera layouts are listed in the mixers' docstrings
(``tessera/layers/mixers/mamba.py``, ``mamba2.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.mapping import (
    DEPTHWISE_CONV,
    FLAT,
    LINEAR,
    Family,
    Field,
    Initial,
    Require,
    Rule,
    Set,
    register,
)

_MIXER = "backbone.layers.{layer}.mixer."

_COMMON_RULES = (
    Rule("backbone.embeddings.weight", "embed/embedding"),
    Rule("backbone.norm_f.weight", "final_norm/scale"),
    Rule("lm_head.weight", "head/kernel", LINEAR),
    Rule("backbone.layers.{layer}.norm.weight", "norm1/scale"),
)


def _common(*, tie: bool) -> tuple:
    """Config parts both share; Mamba has no position limit, so max_seq_len (which bounds
    data.seq_len and decode lengths) starts at the published configs' 2048."""
    return (
        Field("vocab_size", "vocab_size"),
        Field("hidden_size", "d_model"),
        Field("num_hidden_layers", "num_layers"),
        Field("state_size", "ssm.state_dim"),
        Field("expand", "ssm.expand", 2),
        Field("conv_kernel", "ssm.conv_width", 4),
        Field("use_bias", "ssm.bias", False),
        Field("use_conv_bias", "ssm.conv_bias", True),
        Field("layer_norm_epsilon", "norm_eps", 1e-5),
        Field("tie_word_embeddings", "tie_embeddings", tie),
        Require("hidden_act", "silu"),
        Initial(max_seq_len=2048),
    )


register(
    Family(
        model_type="mamba",
        architecture="MambaForCausalLM",
        config=(
            *_common(tie=True),
            Field(
                "time_step_rank",
                "ssm.dt_rank",
                "auto",
                to_ours=lambda v: 0 if v == "auto" else int(v),  # 0: ceil(d_model / 16), = auto
                to_theirs=lambda v: int(v) or "auto",
            ),
            Set(pattern=("mamba:none",), prefix=()),
        ),
        rules=(
            *_COMMON_RULES,
            Rule(_MIXER + "in_proj.weight", "mixer/in_proj", LINEAR),
            Rule(_MIXER + "in_proj.bias", "mixer/in_proj_bias", FLAT),
            Rule(_MIXER + "conv1d.weight", "mixer/conv_weight", DEPTHWISE_CONV),
            Rule(_MIXER + "conv1d.bias", "mixer/conv_bias"),
            Rule(_MIXER + "x_proj.weight", "mixer/x_proj", LINEAR),
            Rule(_MIXER + "dt_proj.weight", "mixer/dt_proj_weight", LINEAR),
            Rule(_MIXER + "dt_proj.bias", "mixer/dt_proj_bias"),
            Rule(_MIXER + "A_log", "mixer/A_log"),
            Rule(_MIXER + "D", "mixer/D"),
            Rule(_MIXER + "out_proj.weight", "mixer/out_proj", LINEAR),
            Rule(_MIXER + "out_proj.bias", "mixer/out_proj_bias"),
        ),
        ignore=("lm_head.weight",),
    )
)


class Mamba2Heads:
    """``num_heads`` and ``head_dim`` (tessera derives the heads: expand * d_model / head_dim)
    and ``time_step_limit`` (the clamp of softplus(dt))."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        head_dim = int(hf.get("head_dim", 64))
        inner = int(hf.get("expand", 2) * hf["hidden_size"])
        heads = hf.get("num_heads", 128)
        if heads * head_dim != inner:
            raise ConversionError(
                f"num_heads={heads} x head_dim={head_dim} != expand x hidden_size = {inner}"
            )
        low, high = hf.get("time_step_limit") or (0.0, float("inf"))
        return {"ssm.head_dim": head_dim, "ssm.dt_limit_min": low, "ssm.dt_limit_max": high}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        s = model.ssm
        return {
            "head_dim": int(s.head_dim),
            "num_heads": int(s.expand * model.d_model) // int(s.head_dim),
            "time_step_limit": [float(s.dt_limit_min), float(s.dt_limit_max)],
        }


register(
    Family(
        model_type="mamba2",
        architecture="Mamba2ForCausalLM",
        config=(
            *_common(tie=False),
            Mamba2Heads(),
            Field("n_groups", "ssm.num_groups", 8),
            Field("chunk_size", "ssm.chunk_size", 256),
            Set(pattern=("mamba2:none",), prefix=()),
        ),
        rules=(
            *_COMMON_RULES,
            Rule(_MIXER + "in_proj.weight", "mixer/in_proj", LINEAR),
            Rule(_MIXER + "in_proj.bias", "mixer/in_proj_bias"),
            Rule(_MIXER + "conv1d.weight", "mixer/conv1d_weight", DEPTHWISE_CONV),
            Rule(_MIXER + "conv1d.bias", "mixer/conv1d_bias"),
            Rule(_MIXER + "dt_bias", "mixer/dt_bias"),
            Rule(_MIXER + "A_log", "mixer/A_log"),
            Rule(_MIXER + "D", "mixer/D"),
            Rule(_MIXER + "norm.weight", "mixer/norm_weight"),
            Rule(_MIXER + "out_proj.weight", "mixer/out_proj", LINEAR),
            Rule(_MIXER + "out_proj.bias", "mixer/out_proj_bias"),
        ),
        ignore=("lm_head.weight",),
    )
)
