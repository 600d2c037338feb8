"""Checkpoints: exact resume after an interruption, restore onto another mesh, clear errors."""

import os
import signal

import jax
import numpy as np
import pytest

from tessera.train.checkpoints import Checkpointer, CheckpointError
from tessera.train.metrics import read_metrics
from tessera.train.trainer import Trainer, train

from .helpers import tiny_config

STEPS = "train.steps=8,checkpoint.every=3,train.log_every=1,eval.every=4,eval.batches=1"


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes_exactly(tmp_path):
    two = jax.devices()[:2]
    full = train(tiny_config(STEPS, data=2), str(tmp_path / "full"), devices=two)
    assert sorted(full.losses) == list(range(1, 9))

    def kill_at_5(step, metrics):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    workdir = str(tmp_path / "killed")
    first = train(tiny_config(STEPS, data=2), workdir, devices=two, on_step=kill_at_5)
    assert first.interrupted and first.step == 5
    assert Checkpointer(workdir).latest_step() == 5
    second = train(tiny_config(STEPS, data=2), workdir, devices=two)
    assert second.resumed_from == 5 and sorted(second.losses) == [6, 7, 8]
    for step in range(1, 6):
        assert first.losses[step] == pytest.approx(full.losses[step], rel=1e-6)
    for step in range(6, 9):
        assert second.losses[step] == pytest.approx(full.losses[step], rel=1e-6)
    # metrics.jsonl reads as one run: one row per step, no duplicates from the restart.
    assert [r["step"] for r in read_metrics(workdir, "train")] == list(range(1, 9))
    # Evaluations (at 4 before the interruption, at 8 after it) match the uninterrupted run's.
    assert first.evals.keys() == {4} and second.evals.keys() == {8}
    evals = read_metrics(workdir, "eval")
    assert [row.pop("step") for row in evals] == [4, 8]
    for step, row in zip((4, 8), evals):
        assert row == pytest.approx(full.evals[step], rel=1e-6)


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
    workdir = str(tmp_path)
    train(tiny_config("train.steps=2,checkpoint.every=2", fsdp=8), workdir)
    a = Trainer(tiny_config("train.steps=2", fsdp=8), workdir)
    b = Trainer(tiny_config("train.steps=2", data=2, tensor=4), workdir)
    _, state_a, data_a = Checkpointer(workdir).restore(None, a.abstract_state())
    _, state_b, data_b = Checkpointer(workdir).restore(None, b.abstract_state())
    wq_b = state_b["params"]["units"]["blocks"][0]["mixer"]["wq"]
    assert wq_b.sharding == b.state_shardings["params"]["units"]["blocks"][0]["mixer"]["wq"]
    assert "tensor" in str(wq_b.sharding.spec)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 state_a, state_b)
    assert data_a == data_b and data_a


@pytest.mark.slow
def test_incompatible_and_missing_checkpoints(tmp_path):
    workdir = str(tmp_path)
    train(tiny_config("train.steps=1,checkpoint.every=1", data=1), workdir,
          devices=jax.devices()[:1])
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(CheckpointError, match=r"tensor units/blocks/0/mixer/w[oq] has shape "
                                              r"\(2, (128, )?4, .*the model expects"):
        train(tiny_config("train.steps=2,model.num_heads=8,model.num_kv_heads=2", data=1),
              workdir, devices=jax.devices()[:1])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    trainer = Trainer(tiny_config(data=1), workdir, jax.devices()[:1])
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        Checkpointer(workdir).restore(7, trainer.abstract_state())
    with pytest.raises(CheckpointError, match="no checkpoint found in"):
        Checkpointer(str(tmp_path / "empty")).restore(None, trainer.abstract_state())
