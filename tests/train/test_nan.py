"""A non-finite loss stops training with a clear message (or is skipped) and never reaches a
checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.train import tasks
from tessera.train.checkpoints import Checkpointer
from tessera.train.trainer import NonFiniteLossError, Trainer, train

from .helpers import tiny_config


class NanLM(tasks.LMTask):
    def loss(self, model, batch, rng, *, train=True):
        total, weight, sums = super().loss(model, batch, rng, train=train)
        return total * jnp.nan, weight, sums


@pytest.mark.slow
def test_nan_stops_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    one = jax.devices()[:1]
    workdir = str(tmp_path)
    train(tiny_config("train.steps=4,checkpoint.every=2", data=1), workdir, devices=one)
    trainer = Trainer(tiny_config(data=1), workdir, one)
    _, good, _ = Checkpointer(workdir).restore(4, trainer.abstract_state())

    monkeypatch.setitem(tasks.TASKS, "lm", NanLM)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 5.*last good checkpoint "
                                                 "is step 4"):
        train(tiny_config("train.steps=8,checkpoint.every=1", data=1), workdir, devices=one)
    ckpt = Checkpointer(workdir)
    assert ckpt.all_steps() == [2, 4]
    _, after, _ = ckpt.restore(4, trainer.abstract_state())
    jax.tree.map(np.testing.assert_array_equal, good, after)


@pytest.mark.slow
def test_nan_skip_policy_leaves_params_unchanged(tmp_path, monkeypatch):
    one = jax.devices()[:1]
    monkeypatch.setitem(tasks.TASKS, "lm", NanLM)
    cfg = tiny_config("train.steps=3,checkpoint.every=3,train.nan_policy=skip", data=1)
    result = train(cfg, str(tmp_path), devices=one)
    assert result.step == 3 and result.last_metrics["skipped_steps"] >= 1
    trainer = Trainer(cfg, str(tmp_path), one)
    _, state, _ = Checkpointer(str(tmp_path)).restore(3, trainer.abstract_state())
    init = trainer.init_state()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(init["params"]),
                 jax.device_get(state["params"]))
    assert int(state["step"]) == 3
