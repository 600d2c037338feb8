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


def one_step(cfg, workdir, devices=None):
    """(trainer, initial parameters, parameters after one train step, its metrics): one
    compile of the train step."""
    import jax

    from tessera.train.trainer import Trainer

    trainer = Trainer(cfg, str(workdir), devices)
    state = trainer.init_state()
    init = jax.device_get(state["params"])
    batch = trainer.device_batch(next(trainer.task.make_data("train")))
    state, metrics = trainer.step(state, batch)
    return trainer, init, jax.device_get(state["params"]), jax.device_get(metrics)
