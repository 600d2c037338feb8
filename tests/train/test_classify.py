"""The ``classify`` task with ``sequence_classifier`` trains through the same Trainer and CLI,
logs its own metrics and resumes exactly."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.models.registry import build_model
from tessera.train.metrics import read_metrics
from tessera.train.trainer import Trainer, train

from .test_cli import run_train

ONE = jax.devices()[:1]
STEPS = "train.steps=8,train.log_every=1,eval.every=4,eval.batches=2,checkpoint.every=4"
LM_ONLY = {"nll", "perplexity", "tokens_per_s", "eval/nll", "eval/perplexity"}


def config(extra=STEPS):
    return load_config(
        f"classify:tiny,data.global_batch_size=16,checkpoint.async_save=False,"
        f"train.progress=False,train.tensorboard=False,{extra}"
    )


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("classify"))
    return workdir, train(config(), workdir, devices=ONE)


@pytest.mark.slow
def test_logs_its_own_metrics_and_learns(full):
    workdir, result = full
    rows = read_metrics(workdir, "train")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all({"loss", "accuracy", "grad_norm"} <= set(r) for r in rows)
    assert "examples_per_s" in rows[-1] and "mfu" in rows[-1]
    evals = read_metrics(workdir, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    assert all(set(r) == {"step", "eval/loss", "eval/accuracy"} for r in evals)
    assert not LM_ONLY & {k for r in rows + evals for k in r}
    losses = [result.losses[s] for s in range(1, 9)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert 0 <= evals[-1]["eval/accuracy"] <= 1


@pytest.mark.slow
def test_resumes_exactly(full, tmp_path):
    _, result = full

    def kill_at_5(step, metrics):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    workdir = str(tmp_path)
    first = train(config(), workdir, devices=ONE, on_step=kill_at_5)
    second = train(config(), workdir, devices=ONE)
    assert first.interrupted and second.resumed_from == 5
    for step in range(1, 9):
        run = first if step <= 5 else second
        assert run.losses[step] == pytest.approx(result.losses[step], rel=1e-6)
    assert second.evals[8] == pytest.approx(result.evals[8], rel=1e-6)


@pytest.mark.slow
def test_cli_trains_the_tiny_config(tmp_path):
    proc = run_train("--config=classify:tiny", f"--workdir={tmp_path}", "--config.train.steps=4",
                     "--config.eval.every=2", "--config.eval.batches=1",
                     "--config.train.tensorboard=False")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [2, 4]
    assert "accuracy" in rows[-2] and not LM_ONLY & set(rows[-2])
    assert "eval/accuracy" in proc.stdout and "unigram entropy" not in proc.stdout


def test_bad_configs_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"task classify needs model.num_classes > 0"):
        Trainer(config("model.num_classes=0"), str(tmp_path), ONE)
    with pytest.raises(ValueError, match=r"model.num_classes=3 is fewer than the 4 rules"):
        Trainer(config("model.num_classes=3"), str(tmp_path), ONE)
    with pytest.raises(ValueError, match="unknown task 'nope'; known:.*'classify'.*'lm'"):
        Trainer(config("train.task=nope"), str(tmp_path), ONE)
    trainer = Trainer(config("data.source=text,data.path=x.txt"), str(tmp_path), ONE)
    with pytest.raises(ValueError, match="data.source must be 'synthetic'"):
        trainer.task.make_data("train")


def test_readout_is_the_last_real_token():
    cfg = config().model
    cfg.dtype = "float32"
    model = build_model(cfg, rngs=nnx.Rngs(0))
    assert "vocab" not in str(nnx.state(model.head))  # no vocabulary head
    row = [5, 6, 7, 0, 0]
    tokens = jnp.array([row, [5, 6, 7, 40, 40], [5, 6, 40, 0, 0], [8, 9, 10, 11, 12]], jnp.int32)
    segments = jnp.array([[1, 1, 1, 0, 0]] * 3 + [[1] * 5], jnp.int32)
    logits = model(tokens, segment_ids=segments).logits
    assert logits.shape == (4, 4) and logits.dtype == jnp.float32
    # Padding after the last real token does not change a row's logits; its last token does.
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-6)
    assert not np.allclose(logits[2], logits[0])
