"""RWKV-7 "Goose" LM (attention-free; blocks ``layernorm -> rwkv7 -> residual -> layernorm ->
rwkv7_cmix -> residual``, ln0 after the embedding): ``tiny`` for CPU and the published
RWKV-7 World / "g1" shapes (``0.1b``, ``1.5b``, ``7b``).

The first layer stores the values the later layers mix back in (the value residual, a
cross-layer stream), so it is a prefix block and the scanned pattern holds the other layers.
Published shapes: head size 64, vocabulary 65536 (the RWKV World tokenizer), FFN 4 D, untied
embeddings, LayerNorm eps 1e-5, LoRA ranks by the official RWKV-7 rule for width D
(``layers/mixers/rwkv7.py::lora_ranks``): decay and a max(32, round(1.8 sqrt(D) / 32) * 32),
v with 1.3, gate max(32, round(0.6 D^0.8 / 32) * 32). That gives 64/64/32/128 at D = 768
(rwkv7-g1 0.1B), 96/96/64/256 at 2048 (1.5B), 96/96/64/320 at 2560 (2.9B) and 128/128/96/480 at
4096 (7B; derived from the rule).
"""

from tessera.configs.base import ConfigDict, make_get_config


def _rwkv7(c: ConfigDict, *, d_model: int, num_layers: int, **model) -> None:
    block = "rwkv7:rwkv7_cmix"
    c.model.update(
        family="rwkv7",
        d_model=d_model,
        num_layers=num_layers,
        head_dim=64,
        mlp_dim=4 * d_model,
        prefix=(block,),
        pattern=(block,),
        norm="layernorm",
        norm_eps=1e-5,
        embed_norm=True,
        tie_embeddings=False,
        **model,
    )


def _tiny(c: ConfigDict) -> None:
    """Trains on the embedded corpus on CPU in seconds: 4 layers of width 128, 4 heads of 32."""
    _rwkv7(c, d_model=128, num_layers=4)
    c.model.head_dim = 32
    c.model.rwkv7.update(
        decay_low_rank_dim=16, a_low_rank_dim=16, v_low_rank_dim=8, gate_low_rank_dim=32
    )


def _published(c: ConfigDict, *, d_model: int, num_layers: int) -> None:
    _rwkv7(c, d_model=d_model, num_layers=num_layers, vocab_size=65536, max_seq_len=4096)
    c.model.rwkv7.chunk_size = 16
    c.data.update(seq_len=4096, global_batch_size=256)
    c.optim.update(learning_rate=6e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1)


def _0_1b(c: ConfigDict) -> None:
    """RWKV-7 0.1B (rwkv7-g1 0.1B, fla-hub/rwkv7-0.1B-world): D 768, 12 layers, 12 heads of 64,
    LoRA ranks 64/64/32/128."""
    _published(c, d_model=768, num_layers=12)


def _1_5b(c: ConfigDict) -> None:
    """RWKV-7 1.5B: D 2048, 24 layers, 32 heads of 64, LoRA ranks 96/96/64/256."""
    _published(c, d_model=2048, num_layers=24)


def _7b(c: ConfigDict) -> None:
    """RWKV-7 7.2B: D 4096, 32 layers, 64 heads of 64, LoRA ranks 128/128/96/480."""
    _published(c, d_model=4096, num_layers=32)
    c.model.remat = "full"


get_config = make_get_config({"tiny": _tiny, "0.1b": _0_1b, "1.5b": _1_5b, "7b": _7b})
