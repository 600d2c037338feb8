"""Mixtral: a Llama-style GQA decoder whose MLPs are sparse mixtures of SwiGLU experts (pattern
``attention:moe``; softmax router, top-2, renormalised weights). ``tiny`` for CPU and the
published Mixtral-8x7B shape (``8x7b``).

HF's ``router_aux_loss_coef`` (0.02) weighs num_experts_per_tok times tessera's balance loss,
averaged over the layers; tessera sums per-layer losses, so the same pull is
``0.02 * k / num_layers`` per layer.
"""

from tessera.configs.base import ConfigDict, balance_coef_from_hf, make_get_config


def _mixtral(c: ConfigDict, *, experts: int, k: int, expert_dim: int) -> None:
    c.model.update(family="mixtral", pattern=("attention:moe",))
    c.model.moe.update(
        num_experts=experts,
        num_experts_per_tok=k,
        expert_dim=expert_dim,
        score_func="softmax",
        norm_topk_prob=True,
        aux_loss_coef=balance_coef_from_hf(0.02, k, c.model.num_layers),
    )


def _tiny(c: ConfigDict) -> None:
    """4 experts, top-2, width 128 (experts of 192): learns the embedded corpus on CPU."""
    _mixtral(c, experts=4, k=2, expert_dim=192)


def _8x7b(c: ConfigDict) -> None:
    """mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active per token."""
    c.model.update(
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_seq_len=32768,
        rope_theta=1e6,
        norm_eps=1e-5,
        remat="full",
    )
    _mixtral(c, experts=8, k=2, expert_dim=14336)
    c.data.update(seq_len=4096, global_batch_size=256)
    c.optim.update(learning_rate=3e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1, expert=8)


get_config = make_get_config({"tiny": _tiny, "8x7b": _8x7b})
