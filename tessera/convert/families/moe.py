"""Mixture-of-experts and multi-head latent attention families: Mixtral, Qwen2-MoE, Qwen3-MoE
(GQA attention + ``moe``) and DeepSeek-V2 / V3 (``mla`` attention, dense first layers, then
``moe`` with shared experts).

Hub checkpoints (and transformers 5's ``save_pretrained``) store one tensor per expert
(``...experts.{e}.gate_proj.weight``); the ``{expert}`` rules stack them on the expert axis of
``channel/wi_gate`` / ``wi_up`` / ``wo`` [E, ...] (``layers/moe.py``). DeepSeek rotates the RoPE
part of queries and keys as interleaved pairs: the import sets ``mla.rope_interleave``, which
the MLA mixer implements, so no weight is permuted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict, balance_coef_from_hf
from tessera.convert.errors import ConversionError
from tessera.convert.families.llama import IGNORE, decoder
from tessera.convert.families.llama import RULES as LLAMA_RULES
from tessera.convert.families.rope import Rope
from tessera.convert.mapping import (
    LINEAR,
    Dropped,
    Family,
    Field,
    Linear,
    Require,
    Rule,
    Set,
    register,
)
from tessera.models.layout import parse_layout

_LAYER = "model.layers.{layer}."

# Attention, norms, embeddings and the dense MLP of the Llama table (DeepSeek's dense layers
# use the same MLP names).
_BASE = tuple(r for r in LLAMA_RULES if "mlp." not in r.hf)
_DENSE_MLP = tuple(
    Rule(r.hf, r.ours, r.transform, channel="mlp") for r in LLAMA_RULES if "mlp." in r.hf
)


class BalanceLossCoef:
    """HF's ``router_aux_loss_coef`` c (Mixtral, Qwen-MoE): their loss is num_experts_per_tok
    times tessera's per-layer ``moe_balance_loss`` and averaged over layers, so tessera's
    ``moe.aux_loss_coef`` is c * k / num_layers (``docs/design.md``, Mixture of experts)."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        c = float(hf.get("router_aux_loss_coef", 0.001))
        k, layers = int(hf["num_experts_per_tok"]), int(hf["num_hidden_layers"])
        return {"moe.aux_loss_coef": balance_coef_from_hf(c, k, layers)}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        k, layers = int(model.moe.num_experts_per_tok), int(model.num_layers)
        return {"router_aux_loss_coef": float(model.moe.aux_loss_coef) * layers / k}


def _experts(moe: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Router and routed experts under HF module ``moe`` (``mlp`` / ``block_sparse_moe``)."""
    experts = f"{_LAYER}{moe}.experts.{{expert}}."
    return (
        Rule(f"{_LAYER}{moe}.gate.weight", "channel/router", LINEAR, channel="moe"),
        Rule(f"{experts}{gate}.weight", "channel/wi_gate", LINEAR, channel="moe"),
        Rule(f"{experts}{up}.weight", "channel/wi_up", LINEAR, channel="moe"),
        Rule(f"{experts}{down}.weight", "channel/wo", LINEAR, channel="moe"),
    )


def _shared(module: str) -> tuple[Rule, ...]:
    """The shared expert(s): an ordinary SwiGLU MLP ``channel/shared``."""
    return (
        Rule(f"{_LAYER}mlp.{module}.gate_proj.weight", "channel/shared/wi_gate", LINEAR,
             channel="moe"),
        Rule(f"{_LAYER}mlp.{module}.up_proj.weight", "channel/shared/wi_up", LINEAR,
             channel="moe"),
        Rule(f"{_LAYER}mlp.{module}.down_proj.weight", "channel/shared/wo", LINEAR,
             channel="moe"),
    )


def _attention_decoder(*, max_position: int, head_dim: Any = None) -> tuple:
    """The Llama table's decoder keys without a dense MLP width (Mixtral's intermediate_size is
    its experts'), plus the router-logits switch."""
    return (
        *decoder(max_position=max_position, head_dim=head_dim, layout=False, mlp=False),
        Dropped("output_router_logits", False, "router logits are not returned by tessera"),
    )


def _qwen_moe(*, shared: bool) -> tuple:
    """Qwen2-MoE / Qwen3-MoE routing keys; every layer sparse (decoder_sparse_step 1, no
    mlp_only_layers), softmax scores."""
    parts: tuple = (
        # Hub configs say num_experts; transformers 5 saves Qwen3-MoE's as num_local_experts.
        Field("num_experts", "moe.num_experts", lambda hf: hf["num_local_experts"]),
        Field("num_experts_per_tok", "moe.num_experts_per_tok"),
        Field("moe_intermediate_size", "moe.expert_dim"),
        Field("norm_topk_prob", "moe.norm_topk_prob", False),
        BalanceLossCoef(),
        Field("intermediate_size", "mlp_dim"),
        Require("decoder_sparse_step", 1),
        Require("mlp_only_layers", []),
        Require("use_sliding_window", False),
        Set(
            pattern=("attention:moe",),
            prefix=(),
            **{"moe.score_func": "softmax", "moe.n_group": 1, "moe.topk_group": 1},
        ),
    )
    if shared:
        parts += (
            Field("shared_expert_intermediate_size", "moe.shared_expert_dim"),
            Set(**{"moe.num_shared_experts": 1, "moe.shared_expert_gate": True}),
        )
    else:
        parts += (Set(**{"moe.num_shared_experts": 0, "moe.shared_expert_gate": False}),)
    return parts


register(
    Family(
        model_type="mixtral",
        architecture="MixtralForCausalLM",
        config=(
            *_attention_decoder(max_position=4096 * 32),
            Field("num_local_experts", "moe.num_experts"),
            Field("num_experts_per_tok", "moe.num_experts_per_tok"),
            Field("intermediate_size", "moe.expert_dim"),
            BalanceLossCoef(),
            Field(
                "sliding_window",
                "sliding_window",
                None,
                to_ours=lambda v: int(v or 0),
                to_theirs=lambda v: int(v) or None,
                keep_null=True,
            ),
            Dropped("router_jitter_noise", 0.0, "tessera adds no router noise"),
            Require("attention_bias", False),
            Set(
                pattern=("attention:moe",),
                prefix=(),
                qkv_bias=False,
                qk_norm=False,
                **{
                    "moe.score_func": "softmax",
                    "moe.norm_topk_prob": True,
                    "moe.num_shared_experts": 0,
                    "moe.shared_expert_gate": False,
                    "moe.n_group": 1,
                    "moe.topk_group": 1,
                },
            ),
        ),
        rules=(*_BASE, *_experts("block_sparse_moe", "w1", "w3", "w2")),
        ignore=IGNORE,
    )
)

register(
    Family(
        model_type="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        config=(
            *_attention_decoder(max_position=32768),
            *_qwen_moe(shared=True),
            Set(qkv_bias=True, qk_norm=False, sliding_window=0),
        ),
        rules=(
            *_BASE,
            *_experts("mlp", "gate_proj", "up_proj", "down_proj"),
            *_shared("shared_expert"),
            Rule(_LAYER + "mlp.shared_expert_gate.weight", "channel/shared_gate", LINEAR),
        ),
        ignore=IGNORE,
    )
)

register(
    Family(
        model_type="qwen3_moe",
        architecture="Qwen3MoeForCausalLM",
        config=(
            *_attention_decoder(max_position=32768, head_dim=128),
            *_qwen_moe(shared=False),
            Require("attention_bias", False),
            Set(qkv_bias=False, qk_norm=True, sliding_window=0),
        ),
        rules=(*_BASE, *_experts("mlp", "gate_proj", "up_proj", "down_proj")),
        ignore=IGNORE,
    )
)


# -- DeepSeek ----------------------------------------------------------------------------------

_ATTN = _LAYER + "self_attn."
_MLA_RULES = (
    Rule(_ATTN + "q_proj.weight", "mixer/wq", LINEAR),
    Rule(_ATTN + "q_a_proj.weight", "mixer/wq_a", LINEAR),
    Rule(_ATTN + "q_a_layernorm.weight", "mixer/q_norm/scale"),
    Rule(_ATTN + "q_b_proj.weight", "mixer/wq_b", LINEAR),
    Rule(_ATTN + "kv_a_proj_with_mqa.weight", "mixer/wkv_a", LINEAR),
    Rule(_ATTN + "kv_a_layernorm.weight", "mixer/kv_norm/scale"),
    Rule(_ATTN + "kv_b_proj.weight", "mixer/wkv_b", LINEAR),
    Rule(_ATTN + "o_proj.weight", "mixer/wo", Linear(in_dims=2)),
)
_DEEPSEEK_RULES = (
    Rule("model.embed_tokens.weight", "embed/embedding"),
    Rule("model.norm.weight", "final_norm/scale"),
    Rule("lm_head.weight", "head/kernel", LINEAR),
    Rule(_LAYER + "input_layernorm.weight", "norm1/scale"),
    Rule(_LAYER + "post_attention_layernorm.weight", "norm2/scale"),
    *_MLA_RULES,
    *_DENSE_MLP,
    *_experts("mlp", "gate_proj", "up_proj", "down_proj"),
    Rule(_LAYER + "mlp.gate.e_score_correction_bias", "channel/router_bias"),
    *_shared("shared_experts"),
)

class DeepseekLayers:
    """``first_k_dense_replace`` dense (``mla:mlp``) layers as the prefix, then ``mla:moe``
    repeated; every later layer sparse (``moe_layer_freq`` 1)."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        layers = int(hf["num_hidden_layers"])
        dense = int(hf.get("first_k_dense_replace") or 0)
        if int(hf.get("moe_layer_freq", 1)) != 1:
            raise ConversionError(f"moe_layer_freq={hf['moe_layer_freq']} is not supported (1)")
        if not hf.get("n_routed_experts") or dense >= layers:
            return {"prefix": (), "pattern": ("mla:mlp",)}
        return {"prefix": ("mla:mlp",) * dense, "pattern": ("mla:moe",)}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        kinds = [(s.mixer, s.channel) for s in parse_layout(model).layers()]
        dense = next((i for i, k in enumerate(kinds) if k != ("mla", "mlp")), len(kinds))
        if any(k != ("mla", "moe") for k in kinds[dense:]):
            raise ConversionError(
                "DeepSeek layers are mla:mlp followed by mla:moe; this model has "
                + ", ".join(f"{m}:{c}" for m, c in kinds)
            )
        return {"first_k_dense_replace": dense, "moe_layer_freq": 1}


class DeepseekV2Routing:
    """DeepSeek-V2's ``topk_method``: ``greedy`` (top-k of the softmax scores) or
    ``group_limited_greedy`` (only the ``topk_group`` groups with the best single score are
    eligible). V2 never renormalises the selected weights, whatever ``norm_topk_prob`` says."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        method = hf.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ConversionError(
                f"topk_method {method!r} is not supported; supported: greedy, "
                "group_limited_greedy"
            )
        grouped = method == "group_limited_greedy"
        return {
            "moe.score_func": "softmax",
            "moe.group_score": "max",
            "moe.n_group": int(hf.get("n_group") or 1) if grouped else 1,
            "moe.topk_group": int(hf.get("topk_group") or 1) if grouped else 1,
            "moe.norm_topk_prob": False,
            "moe.router_bias": False,
        }

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        moe = model.moe
        want = {"score_func": "softmax", "norm_topk_prob": False, "router_bias": False}
        for key, value in want.items():
            if moe[key] != value:
                raise ConversionError(f"DeepSeek-V2 routing needs moe.{key}={value!r}")
        grouped = int(moe.n_group) > 1
        if grouped and moe.group_score != "max":
            raise ConversionError("DeepSeek-V2 group-limited routing needs moe.group_score='max'")
        return {
            "topk_method": "group_limited_greedy" if grouped else "greedy",
            "n_group": int(moe.n_group) if grouped else None,
            "topk_group": int(moe.topk_group) if grouped else None,
            "norm_topk_prob": False,
        }


class DeepseekV3Routing:
    """DeepSeek-V3's only router: sigmoid scores, a selection bias
    (``e_score_correction_bias``), groups ranked by the sum of their two best biased scores."""

    FIXED = {"score_func": "sigmoid", "group_score": "top2_sum", "router_bias": True}

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **{f"moe.{k}": v for k, v in self.FIXED.items()},
            "moe.n_group": int(hf.get("n_group") or 8),
            "moe.topk_group": int(hf.get("topk_group") or 4),
            "moe.norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
        }

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        for key, value in self.FIXED.items():
            if model.moe[key] != value:
                raise ConversionError(f"DeepSeek-V3 routing needs moe.{key}={value!r}")
        return {
            "n_group": int(model.moe.n_group),
            "topk_group": int(model.moe.topk_group),
            "norm_topk_prob": bool(model.moe.norm_topk_prob),
        }


class SharedExperts:
    """``n_shared_experts`` experts of ``moe_intermediate_size`` <-> one shared MLP of
    ``n_shared_experts * moe_intermediate_size``."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        n = int(hf.get("n_shared_experts") or 0)
        return {
            "moe.num_shared_experts": n,
            "moe.shared_expert_dim": n * int(hf["moe_intermediate_size"]),
            "moe.shared_expert_gate": False,
        }

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        n = int(model.moe.num_shared_experts)
        if n and int(model.moe.shared_expert_dim) != n * int(model.moe.expert_dim):
            raise ConversionError(
                f"moe.shared_expert_dim={model.moe.shared_expert_dim} is not num_shared_experts "
                f"({n}) x expert_dim ({model.moe.expert_dim})"
            )
        if model.moe.shared_expert_gate:
            raise ConversionError("DeepSeek has no shared-expert gate (moe.shared_expert_gate)")
        return {"n_shared_experts": n or None}


def _deepseek(*, routing: Any, scaling: float) -> tuple:
    return (
        Field("vocab_size", "vocab_size"),
        Field("hidden_size", "d_model"),
        Field("num_hidden_layers", "num_layers"),
        Field("num_attention_heads", "num_heads"),
        Field("num_attention_heads", "num_kv_heads"),  # unused by MLA; keeps GQA checks quiet
        Field("intermediate_size", "mlp_dim"),
        Field("max_position_embeddings", "max_seq_len", 163840),
        Field("rms_norm_eps", "norm_eps", 1e-6),
        Field("tie_word_embeddings", "tie_embeddings", False),
        Field(
            "q_lora_rank",
            "mla.q_lora_rank",
            1536,
            to_ours=lambda v: int(v or 0),
            to_theirs=lambda v: int(v) or None,
            keep_null=True,
        ),
        Field("kv_lora_rank", "mla.kv_lora_rank", 512),
        Field("qk_nope_head_dim", "mla.qk_nope_head_dim", 128),
        Field("qk_rope_head_dim", "mla.qk_rope_head_dim", 64),
        Field("v_head_dim", "mla.v_head_dim", 128),
        Field("rope_interleave", "mla.rope_interleave", True),
        Field("n_routed_experts", "moe.num_experts"),
        Field("num_experts_per_tok", "moe.num_experts_per_tok"),
        Field("moe_intermediate_size", "moe.expert_dim"),
        Field("routed_scaling_factor", "moe.routed_scaling_factor", scaling),
        Require("hidden_act", "silu"),
        Require("attention_bias", False),
        Require("ep_size", 1),
        Rope(deepseek_mscale=True),
        DeepseekLayers(),
        routing,
        SharedExperts(),
        Set(qkv_bias=False, qk_norm=False, sliding_window=0),
    )


register(
    Family(
        model_type="deepseek_v2",
        architecture="DeepseekV2ForCausalLM",
        config=_deepseek(routing=DeepseekV2Routing(), scaling=1.0),
        rules=_DEEPSEEK_RULES,
        ignore=IGNORE,
    )
)

register(
    Family(
        model_type="deepseek_v3",
        architecture="DeepseekV3ForCausalLM",
        config=_deepseek(routing=DeepseekV3Routing(), scaling=2.5),
        rules=_DEEPSEEK_RULES,
        ignore=IGNORE,
    )
)
