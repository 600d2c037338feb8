"""Small configs and runners shared by the train tests."""

from __future__ import annotations

from tessera.configs import load_config

QUIET = "train.progress=False,train.tensorboard=False"


def tiny_config(extra: str = "", family: str = "llama", **mesh):
    """A float32 tiny LM with short rows, so steps are fast and comparisons tight; no evaluation
    unless ``extra`` sets ``eval.every``."""
    cfg = load_config(
        f"{family}:tiny,model.dtype=float32,data.seq_len=32,data.global_batch_size=8,optim.warmup_steps=0,"
        f"checkpoint.async_save=False,eval.every=0,{QUIET}{',' + extra if extra else ''}"
    )
    if mesh:
        cfg.mesh.update(data=1)
        cfg.mesh.update(**mesh)
    return cfg
