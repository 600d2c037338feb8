"""Qwen-MoE: GQA attention with q/k RMSNorm and sparse MoE MLPs (pattern ``attention:moe``;
softmax router, top-k renormalised, no shared expert: Qwen3-MoE). ``tiny`` for CPU and the
published Qwen3-30B-A3B shape (``30b_a3b``). Qwen2-MoE's shared expert with its sigmoid gate is
``model.moe.num_shared_experts=1, shared_expert_dim=..., shared_expert_gate=True``.

HF's ``router_aux_loss_coef`` (0.001) weighs num_experts_per_tok times tessera's balance loss,
averaged over the layers: ``0.001 * k / num_layers`` per layer here.
"""

from tessera.configs.base import ConfigDict, balance_coef_from_hf, make_get_config


def _qwen_moe(c: ConfigDict, *, experts: int, k: int, expert_dim: int) -> None:
    c.model.update(family="qwen_moe", pattern=("attention:moe",), qk_norm=True)
    c.model.moe.update(
        num_experts=experts,
        num_experts_per_tok=k,
        expert_dim=expert_dim,
        score_func="softmax",
        norm_topk_prob=True,
        aux_loss_coef=balance_coef_from_hf(0.001, k, c.model.num_layers),
    )


def _tiny(c: ConfigDict) -> None:
    """8 fine-grained experts of width 64, top-2, at width 128; trains on CPU in seconds."""
    _qwen_moe(c, experts=8, k=2, expert_dim=64)


def _30b_a3b(c: ConfigDict) -> None:
    """Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active per token."""
    c.model.update(
        vocab_size=151936,
        d_model=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        max_seq_len=40960,
        rope_theta=1e6,
        norm_eps=1e-6,
        remat="full",
    )
    _qwen_moe(c, experts=128, k=8, expert_dim=768)
    c.data.update(seq_len=4096, global_batch_size=256)
    c.optim.update(learning_rate=3e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1, expert=8)


get_config = make_get_config({"tiny": _tiny, "30b_a3b": _30b_a3b})
