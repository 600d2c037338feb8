"""Asynchronous checkpoint saves (``checkpoint.async_save=True``, the default): interrupted and
resumed, a run equals the uninterrupted one."""

import os
import signal

import jax
import numpy as np
import pytest

from tessera.train.checkpoints import Checkpointer
from tessera.train.trainer import Trainer, train

from .helpers import tiny_config

STEPS = "train.steps=6,checkpoint.every=2,checkpoint.async_save=True"


@pytest.mark.slow
def test_async_saves_resume_exactly(tmp_path):
    one = jax.devices()[:1]
    full = train(tiny_config(STEPS, data=1), str(tmp_path / "full"), devices=one)

    def kill_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    # One Trainer (one compile) runs twice, as two processes would: each run restores from disk.
    workdir = str(tmp_path / "killed")
    trainer = Trainer(tiny_config(STEPS, data=1), workdir, one)
    first = trainer.run(on_step=kill_at_3)  # saves at 2 (async, in flight) and at 3
    assert first.interrupted and Checkpointer(workdir).all_steps() == [2, 3]
    second = trainer.run()
    assert second.resumed_from == 3 and sorted(second.losses) == [4, 5, 6]
    for step in range(1, 7):
        got = first.losses.get(step, second.losses.get(step))
        assert got == pytest.approx(full.losses[step], rel=1e-6), step
    # The last checkpoints hold the same state, bit for bit.
    target = trainer.abstract_state()
    _, want, _ = Checkpointer(str(tmp_path / "full")).restore(6, target)
    _, got, _ = Checkpointer(workdir).restore(6, target)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 want, got)
