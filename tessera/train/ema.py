"""An exponential moving average of the parameters, kept as extra train state.

``ema <- decay * ema + (1 - decay) * params`` after every applied optimizer step, starting from the
initial parameters. It has the parameters' tree, shapes and shardings, so the Trainer places,
checkpoints and restores it like them; evaluation also runs on it (``eval_ema/...`` rows). Any
task can keep one (``train.ema_decay > 0``); diffusion samples from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class EMA:
    """Parameter-shaped train state (see ``tasks.base.ParamState``) with decay in [0, 1)."""

    decay: float

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.decay}")

    def init(self, params: PyTree) -> PyTree:
        """The average before any step: a copy of ``params``."""
        return jax.tree.map(jnp.copy, params)

    def update(self, ema: PyTree, params: PyTree) -> PyTree:
        """One step of the average towards the updated ``params``."""
        d = self.decay
        return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
