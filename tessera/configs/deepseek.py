"""DeepSeek LMs: multi-head latent attention (``mla``) and a mixture of experts (``moe``) with
shared experts in every layer after the first dense ones (HF ``first_k_dense_replace``: the
layout's ``prefix``). ``tiny`` for CPU; ``v2_lite`` and ``v3`` are the published shapes
(``model.num_kv_heads`` and ``head_dim`` are unused by mla). RoPE is yarn with DeepSeek's
mscale / mscale_all_dim (``layers/positions.py``), over 163840 positions from 4096.
"""

from tessera.configs.base import ConfigDict, make_get_config


def _tiny(c: ConfigDict) -> None:
    """V3-like at width 128: a dense MLA layer, then two MLA + MoE layers (8 experts in 4
    groups, top-2 from the best 2 groups, sigmoid scores with a balancing bias, one shared
    expert); trains on CPU in seconds. The cache keeps 64 + 16 values per token and layer; the
    decompressed keys and values it stands for are 4 x (48 + 32) = 320."""
    c.model.update(family="deepseek", prefix=("mla:mlp",), pattern=("mla:moe",), num_layers=3,
                   d_model=128, num_heads=4, mlp_dim=384)
    c.model.mla.update(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                       v_head_dim=32)
    c.model.moe.update(num_experts=8, num_experts_per_tok=2, expert_dim=96,
                       num_shared_experts=1, shared_expert_dim=96, score_func="sigmoid",
                       router_bias=True, bias_update_rate=1e-3, n_group=4, topk_group=2,
                       group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5,
                       aux_loss_coef=1e-3)


def _published(c: ConfigDict, *, dense_layers: int, **model) -> None:
    c.model.update(family="deepseek", prefix=("mla:mlp",) * dense_layers, pattern=("mla:moe",),
                   norm_eps=1e-6, rope_theta=10000.0, max_seq_len=163840, tie_embeddings=False,
                   remat="full", **model)
    c.model.mla.rope_interleave = True  # the published checkpoints' rope layout
    c.model.rope_scaling.update(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                beta_fast=32.0, beta_slow=1.0)
    c.data.update(seq_len=4096, global_batch_size=256)
    c.optim.update(learning_rate=2.4e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1, expert=8)  # experts split 8 ways, the rest FSDP


def _v2_lite(c: ConfigDict) -> None:
    """deepseek-ai/DeepSeek-V2-Lite (15.7B parameters, 2.4B active): d_model 2048, 27 layers,
    16 heads, no query compression, latent 512, nope 128 + rope 64, values 128; mscale =
    mscale_all_dim = 0.707. One dense layer, then 64 routed experts of 1408 (top-6 of the
    softmax, not renormalised) and 2 shared."""
    _published(c, dense_layers=1, d_model=2048, num_layers=27, num_heads=16, mlp_dim=10944,
               vocab_size=102400)
    c.model.moe.update(num_experts=64, num_experts_per_tok=6, expert_dim=1408,
                       num_shared_experts=2, shared_expert_dim=2816, score_func="softmax",
                       norm_topk_prob=False, routed_scaling_factor=1.0, aux_loss_coef=1e-3)
    c.model.rope_scaling.update(mscale=0.707, mscale_all_dim=0.707)
    c.model.mla.update(q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128)


def _v3(c: ConfigDict) -> None:
    """deepseek-ai/DeepSeek-V3 (671B parameters, 37B active; without the multi-token
    prediction module): d_model 7168, 61 layers, 128 heads, query rank 1536, latent 512, nope
    128 + rope 64, values 128; mscale = mscale_all_dim = 1.0. Three dense layers, then 256
    routed experts of 2048 (top-8 from the best 4 of 8 groups, sigmoid scores with the
    auxiliary-loss-free balancing bias, renormalised, x 2.5) and 1 shared."""
    _published(c, dense_layers=3, d_model=7168, num_layers=61, num_heads=128, mlp_dim=18432,
               vocab_size=129280)
    c.model.moe.update(num_experts=256, num_experts_per_tok=8, expert_dim=2048,
                       num_shared_experts=1, shared_expert_dim=2048, score_func="sigmoid",
                       router_bias=True, bias_update_rate=1e-3, n_group=8, topk_group=4,
                       group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5,
                       aux_loss_coef=1e-4)
    c.model.rope_scaling.update(mscale=1.0, mscale_all_dim=1.0)
    c.model.mla.update(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128)


get_config = make_get_config({"tiny": _tiny, "v2_lite": _v2_lite, "v3": _v3})
