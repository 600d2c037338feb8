"""Mamba-2 LM (attention-free; blocks ``norm -> mamba2 -> residual``): ``tiny`` for CPU and the
published state-spaces/mamba2 shapes (``130m``, ``2.7b``).

The published checkpoints pad their 50277-token GPT-NeoX vocabulary to a multiple of 16 (50288),
tie embeddings, and use RMSNorm eps 1e-5, conv width 4, one B/C group, chunks of 256.
"""

from tessera.configs.base import ConfigDict, make_get_config


def _mamba2(c: ConfigDict, **model) -> None:
    c.model.update(
        family="mamba2", pattern=("mamba2:none",), tie_embeddings=True, norm_eps=1e-5, **model
    )


def _tiny(c: ConfigDict) -> None:
    """Trains on the embedded corpus on CPU in seconds: 4 layers of width 128, 8 heads of 32."""
    _mamba2(c, d_model=128, num_layers=4)
    c.model.ssm.update(state_dim=16, head_dim=32, expand=2, num_groups=1, chunk_size=32)


def _published(c: ConfigDict, *, d_model: int, num_layers: int) -> None:
    _mamba2(c, d_model=d_model, num_layers=num_layers, vocab_size=50288, max_seq_len=2048)
    c.model.ssm.update(
        state_dim=128, head_dim=64, expand=2, num_groups=1, chunk_size=256, conv_width=4
    )
    c.data.update(seq_len=2048, global_batch_size=256)
    c.optim.update(learning_rate=1e-3, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1)


def _130m(c: ConfigDict) -> None:
    """state-spaces/mamba2-130m: d_model 768, 24 layers, 24 heads of 64, state 128."""
    _published(c, d_model=768, num_layers=24)


def _2_7b(c: ConfigDict) -> None:
    """state-spaces/mamba2-2.7b: d_model 2560, 64 layers, 80 heads of 64, state 128."""
    _published(c, d_model=2560, num_layers=64)
    c.model.remat = "full"


get_config = make_get_config({"tiny": _tiny, "130m": _130m, "2.7b": _2_7b})
