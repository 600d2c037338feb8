"""Mamba-1 LM (attention-free; blocks ``norm -> mamba -> residual``): ``tiny`` for CPU and the
published state-spaces/mamba shapes (``130m``, ``1.4b``, ``2.8b``).

The published checkpoints pad the 50277-token GPT-NeoX vocabulary to 50280, tie embeddings, and use
RMSNorm eps 1e-5, state 16, expand 2, conv width 4, dt rank ceil(d_model / 16), a conv bias and no
projection biases.
"""

from tessera.configs.base import ConfigDict, make_get_config


def _mamba(c: ConfigDict, **model) -> None:
    c.model.update(
        family="mamba", pattern=("mamba:none",), tie_embeddings=True, norm_eps=1e-5, **model
    )
    c.model.ssm.update(state_dim=16, expand=2, conv_width=4, dt_rank=0, conv_bias=True, bias=False)


def _tiny(c: ConfigDict) -> None:
    """Trains on the embedded corpus on CPU in seconds: 2 layers of width 128, state 16."""
    _mamba(c, d_model=128, num_layers=2)
    c.model.ssm.chunk_size = 16


def _published(c: ConfigDict, *, d_model: int, num_layers: int) -> None:
    _mamba(c, d_model=d_model, num_layers=num_layers, vocab_size=50280, max_seq_len=2048)
    c.data.update(seq_len=2048, global_batch_size=256)
    c.optim.update(learning_rate=1e-3, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1)


def _130m(c: ConfigDict) -> None:
    """state-spaces/mamba-130m: d_model 768, 24 layers (d_inner 1536, dt rank 48)."""
    _published(c, d_model=768, num_layers=24)


def _1_4b(c: ConfigDict) -> None:
    """state-spaces/mamba-1.4b: d_model 2048, 48 layers (d_inner 4096, dt rank 128)."""
    _published(c, d_model=2048, num_layers=48)
    c.model.remat = "full"


def _2_8b(c: ConfigDict) -> None:
    """state-spaces/mamba-2.8b: d_model 2560, 64 layers (d_inner 5120, dt rank 160)."""
    _published(c, d_model=2560, num_layers=64)
    c.model.remat = "full"


get_config = make_get_config({"tiny": _tiny, "130m": _130m, "1.4b": _1_4b, "2.8b": _2_8b})
