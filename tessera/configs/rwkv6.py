"""RWKV-6 "Finch" LM (attention-free; blocks ``layernorm -> rwkv6 -> residual -> layernorm ->
rwkv6_cmix -> residual``, a LayerNorm after the embedding (ln0), untied head): ``tiny`` for CPU
and the published Finch shapes (``0.1b``, ``1.6b``, ``7b``).

The published models use head size 64 (H = d_model / 64), key and value widths d_model, the
RWKV World vocabulary (65536), LayerNorm eps 1e-5, channel-mix width int(3.5 d_model) rounded up
to a multiple of 32 (fla's rule; BlinkDL rounds down, the same for these widths), token-shift
LoRA rank 32 and decay LoRA rank 64 (64 and 128 at d_model 4096), and train on 4096 tokens.
"""

from tessera.configs.base import ConfigDict, make_get_config


def ffn_width(d_model: int, ratio: float = 3.5) -> int:
    """int(ratio * d_model) rounded up to a multiple of 32, as fla's RWKV6FeedForward does."""
    return 32 * -(-int(d_model * ratio) // 32)


def _rwkv6(c: ConfigDict, *, d_model: int, **model) -> None:
    c.model.update(
        family="rwkv6",
        pattern=("rwkv6:rwkv6_cmix",),
        d_model=d_model,
        mlp_dim=ffn_width(d_model),
        norm="layernorm",
        norm_eps=1e-5,
        embed_norm=True,
        tie_embeddings=False,
        **model,
    )


def _tiny(c: ConfigDict) -> None:
    """Trains on the embedded corpus on CPU: 4 layers of width 128, 4 heads of 32. Chunks of 8:
    on a CPU the chunked WKV is bound by its elementwise [L, L, K] decay work (a forward and
    backward at this size: 72 ms with L = 8, 190 ms with 16, 160 ms for the sequential scan)."""
    _rwkv6(c, d_model=128, num_layers=4)
    c.model.rwkv6.update(head_dim=32, proj_low_rank_dim=16, gate_low_rank_dim=32, chunk_size=8)


def _published(c: ConfigDict, *, d_model: int, num_layers: int) -> None:
    _rwkv6(c, d_model=d_model, num_layers=num_layers, vocab_size=65536, max_seq_len=4096)
    big = d_model >= 4096
    c.model.rwkv6.update(
        head_dim=64, proj_low_rank_dim=64 if big else 32, gate_low_rank_dim=128 if big else 64
    )
    c.data.update(seq_len=4096, global_batch_size=256)
    c.optim.update(learning_rate=6e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1)


def _0_1b(c: ConfigDict) -> None:
    """RWKV-6 Finch 0.1B: d_model 768, 12 layers, 12 heads of 64, channel mix 2688."""
    _published(c, d_model=768, num_layers=12)


def _1_6b(c: ConfigDict) -> None:
    """RWKV-6 Finch 1.6B: d_model 2048, 24 layers, 32 heads of 64, channel mix 7168."""
    _published(c, d_model=2048, num_layers=24)


def _7b(c: ConfigDict) -> None:
    """RWKV-6 Finch 7B: d_model 4096, 32 layers, 64 heads of 64, channel mix 14336."""
    _published(c, d_model=4096, num_layers=32)
    c.model.remat = "full"


get_config = make_get_config({"tiny": _tiny, "0.1b": _0_1b, "1.6b": _1_6b, "7b": _7b})
