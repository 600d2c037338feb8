"""Llama-style GQA decoder LM: ``tiny`` and ``small`` for CPU, and the published Llama-3 shapes."""

from tessera.configs.base import ConfigDict, make_get_config


def _tiny(c: ConfigDict) -> None:
    """Trains on the embedded corpus on a 2-core CPU in about three minutes (base.py defaults)."""


def _small(c: ConfigDict) -> None:
    c.model.update(
        d_model=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        mlp_dim=1536,
        max_seq_len=1024,
    )
    c.data.update(seq_len=256, global_batch_size=8)
    c.optim.learning_rate = 1e-3


def _llama3(
    c: ConfigDict,
    *,
    d_model: int,
    num_layers: int,
    num_heads: int,
    mlp_dim: int,
    tie: bool,
    rope_factor: float,
) -> None:
    c.model.update(
        vocab_size=128256,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=8,
        head_dim=d_model // num_heads,
        mlp_dim=mlp_dim,
        max_seq_len=131072,
        tie_embeddings=tie,
        rope_theta=500000.0,
        remat="full",
    )
    c.model.rope_scaling.update(
        type="llama3",
        factor=rope_factor,
        original_max_position_embeddings=8192,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
    )
    c.data.update(seq_len=8192, global_batch_size=512)
    c.optim.update(learning_rate=3e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1)


def _1b(c: ConfigDict) -> None:
    """Llama-3.2-1B."""
    _llama3(c, d_model=2048, num_layers=16, num_heads=32, mlp_dim=8192, tie=True, rope_factor=32.0)


def _8b(c: ConfigDict) -> None:
    """Llama-3.1-8B."""
    _llama3(c, d_model=4096, num_layers=32, num_heads=32, mlp_dim=14336, tie=False, rope_factor=8.0)


def _70b(c: ConfigDict) -> None:
    """Llama-3.1-70B."""
    _llama3(c, d_model=8192, num_layers=80, num_heads=64, mlp_dim=28672, tie=False, rope_factor=8.0)


def _llama2(c: ConfigDict, *, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int,
            mlp_dim: int) -> None:
    c.model.update(
        vocab_size=32000,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=d_model // num_heads,
        mlp_dim=mlp_dim,
        max_seq_len=4096,
        rope_theta=10000.0,
        remat="full",
    )
    c.data.update(seq_len=4096, global_batch_size=512)
    c.optim.update(learning_rate=3e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1)


def _llama2_7b(c: ConfigDict) -> None:
    """Llama-2-7B (the shape MaxText's published tables use)."""
    _llama2(c, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008)


def _llama2_70b(c: ConfigDict) -> None:
    """Llama-2-70B."""
    _llama2(c, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8, mlp_dim=28672)


get_config = make_get_config(
    {
        "tiny": _tiny, "small": _small, "1b": _1b, "8b": _8b, "70b": _70b,
        "llama2-7b": _llama2_7b, "llama2-70b": _llama2_70b,
    }
)
