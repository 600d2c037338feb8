"""Tasks: what a family trains on and how (see ``base.Task``); ``train.task`` names one."""

from __future__ import annotations

from tessera.configs.base import ConfigDict
from tessera.train.tasks.base import Feature, ParamState, Task, add_aux_losses
from tessera.train.tasks.classify import ClassifyTask
from tessera.train.tasks.diffusion import DiffusionTask
from tessera.train.tasks.lm import LMTask
from tessera.train.tasks.vae import VAETask

TASKS: dict[str, type[Task]] = {
    "lm": LMTask,
    "classify": ClassifyTask,
    "vae": VAETask,
    "diffusion": DiffusionTask,
}


def get_task(config: ConfigDict, workdir: str = "") -> Task:
    """The task ``config.train.task`` names, built for ``config`` (bad settings fail here)."""
    name = config.train.task
    if name not in TASKS:
        raise ValueError(f"train.task: unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](config, workdir)


__all__ = [
    "TASKS",
    "ClassifyTask",
    "DiffusionTask",
    "Feature",
    "LMTask",
    "ParamState",
    "Task",
    "VAETask",
    "add_aux_losses",
    "get_task",
]
