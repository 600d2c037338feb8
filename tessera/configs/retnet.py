"""RetNet LM (Sun et al. 2023) as flash-linear-attention builds it (``RetNetForCausalLM``):
blocks ``rmsnorm -> retention -> residual -> rmsnorm -> SwiGLU MLP -> residual``; ``tiny`` for
CPU and the paper's shapes ``1.3b``, ``2.7b``, ``6.7b``.

Shapes (paper, Table 2 and section 3.1): d_model 2048 / 2560 / 4096 with 24 / 32 / 32 layers and
8 / 10 / 16 heads (key head 256), query/key width d, value and gate width 2d (expand_v = 2),
sequence length 2048, 4M-token batches, learning rate 6e-4 / 3e-4 / 3e-4; AdamW with
beta2 0.98, weight decay 0.05, 375 warmup steps, linear decay (section 3.1).

FFN: the paper uses a plain two-matrix FFN of width 2d (4 d^2 parameters, like its retention
block's 8 d^2 this keeps each layer at a Transformer's 12 d^2). fla's RetNet, whose weights the
importer loads, uses a SwiGLU ``GatedMLP`` with ``hidden_ratio=2``: width
256 * ceil(int(2 d * 2/3) / 256) (2816 / 3584 / 5632), three matrices, so about the same 4 d^2
parameters. These presets follow fla (``fla_mlp_dim``); total parameters come to 1.35B / 2.72B /
6.77B with fla's default 32000-token vocabulary and untied embeddings. Block norms and the gated
retention norm use fla's RetNetConfig eps 1e-6.
"""

from tessera.configs.base import ConfigDict, make_get_config


def fla_mlp_dim(d_model: int, hidden_ratio: float = 2) -> int:
    """fla ``GatedMLP``'s width when ``intermediate_size`` is unset: the multiple of 256 at or
    above ``int(d_model * hidden_ratio * 2 / 3)``."""
    width = int(d_model * hidden_ratio * 2 / 3)
    return 256 * -(-width // 256)


def _retnet(c: ConfigDict, *, d_model: int, num_heads: int, **model) -> None:
    c.model.update(
        family="retnet",
        pattern=("retention:mlp",),
        d_model=d_model,
        num_heads=num_heads,
        mlp_dim=fla_mlp_dim(d_model),
        mlp_activation="swiglu",
        norm="rmsnorm",
        norm_eps=1e-6,
        rope_theta=10000.0,
        tie_embeddings=False,
        **model,
    )
    c.model.retention.update(expand_k=1.0, expand_v=2.0)


def _tiny(c: ConfigDict) -> None:
    """Trains on the embedded corpus on CPU in seconds: 2 layers of width 128, 4 heads (key 32,
    value 64), MLP 256, chunks of 16."""
    _retnet(c, d_model=128, num_heads=4, num_layers=2)
    c.model.retention.chunk_size = 16


def _published(
    c: ConfigDict, *, d_model: int, num_layers: int, num_heads: int, learning_rate: float
) -> None:
    _retnet(
        c,
        d_model=d_model,
        num_heads=num_heads,
        num_layers=num_layers,
        vocab_size=32000,
        max_seq_len=2048,
        remat="full",
    )
    c.model.retention.chunk_size = 64
    c.data.update(seq_len=2048, global_batch_size=2048)  # 4M tokens per batch
    c.optim.update(
        learning_rate=learning_rate, warmup_steps=375, schedule="linear", b2=0.98, weight_decay=0.05
    )
    c.mesh.update(data=1, fsdp=-1)


def _1_3b(c: ConfigDict) -> None:
    """RetNet 1.3B: d_model 2048, 24 layers, 8 heads."""
    _published(c, d_model=2048, num_layers=24, num_heads=8, learning_rate=6e-4)


def _2_7b(c: ConfigDict) -> None:
    """RetNet 2.7B: d_model 2560, 32 layers, 10 heads."""
    _published(c, d_model=2560, num_layers=32, num_heads=10, learning_rate=3e-4)


def _6_7b(c: ConfigDict) -> None:
    """RetNet 6.7B: d_model 4096, 32 layers, 16 heads."""
    _published(c, d_model=4096, num_layers=32, num_heads=16, learning_rate=3e-4)


get_config = make_get_config({"tiny": _tiny, "1.3b": _1_3b, "2.7b": _2_7b, "6.7b": _6_7b})
