"""Jamba-like hybrid LM: Mamba-2 blocks with an attention block every k-th layer, all with MLPs.

The ratio is the ``pattern``: ``("mamba2:mlp",) * (k - 1) + ("attention:mlp",)`` puts attention
in every k-th layer (k = 4 here; Jamba uses k = 8). Jamba also swaps every other MLP for a
mixture of experts (entries such as ``"mamba2:moe"``, ``model.moe``); these presets keep dense
MLPs. The attention blocks keep RoPE (Jamba's have no positional encoding).
"""

from tessera.configs.base import ConfigDict, make_get_config

PATTERN = ("mamba2:mlp",) * 3 + ("attention:mlp",)


def _tiny(c: ConfigDict) -> None:
    """One unit of the pattern at width 128; trains on CPU in seconds."""
    c.model.update(family="hybrid", pattern=PATTERN, num_layers=4, d_model=128)
    c.model.ssm.update(state_dim=16, head_dim=32, expand=2, num_groups=1, chunk_size=32)


def _small(c: ConfigDict) -> None:
    c.model.update(
        family="hybrid",
        pattern=PATTERN,
        num_layers=16,
        d_model=512,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        mlp_dim=1536,
        max_seq_len=1024,
    )
    c.model.ssm.update(state_dim=64, head_dim=64, expand=2, num_groups=1, chunk_size=64)
    c.data.update(seq_len=256, global_batch_size=8)
    c.optim.learning_rate = 1e-3


get_config = make_get_config({"tiny": _tiny, "small": _small})
