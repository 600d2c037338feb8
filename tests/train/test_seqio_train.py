"""`python -m tessera.train` on a seqio Task registered over a local text file with a
SentencePiece vocabulary trained in the test: the loss goes down and the eval row has the task's
seqio metrics; bad seqio input is one line before training starts."""

import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

pytest.importorskip("seqio")

from tessera.configs import load_config  # noqa: E402
from tessera.train.metrics import read_metrics  # noqa: E402
from tests.data.seqio_registry import VOCAB_SIZE, write_registry  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return write_registry(tmp_path_factory.mktemp("seqio"), f"tessera_cli_{uuid.uuid4().hex[:8]}")


def seqio_args(reg, **overrides):
    args = {
        "data.source": "seqio", "data.task": reg.task, "data.registry_module": reg.path,
        "data.tokenizer": "seqio", "model.vocab_size": VOCAB_SIZE, "data.global_batch_size": 8,
        "data.seq_len": 64, "eval.seqio_examples": 4, "train.tensorboard": False,
        "train.progress": False, **overrides,
    }
    return [f"--config.{k}={v}" for k, v in args.items()]


def run_train(workdir, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, "-m", "tessera.train", "--config=llama:tiny", f"--workdir={workdir}",
         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_cli_trains_on_a_seqio_task(reg, tmp_path):
    proc = run_train(tmp_path, *seqio_args(reg, **{"train.steps": 8, "train.log_every": 4,
                                                  "eval.batches": 1}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in rows] == [1, 4, 8]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    [evaluation] = read_metrics(str(tmp_path), "eval")
    assert evaluation["eval/seqio/examples"] == 4
    assert 0 <= evaluation["eval/seqio/exact_match"] <= 100
    assert evaluation["eval/seqio/mean_score"] < 0  # summed target log-likelihood
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"data.task": "no_such_task"},
     r"data.task='no_such_task' is not a registered seqio Task or Mixture .*registered: "),
    # (a missing registry module and a vocabulary bigger than the model's: tests/data/test_seqio)
])
def test_bad_seqio_input_is_one_line(reg, tmp_path, overrides, message):
    proc = run_train(tmp_path / "w", *seqio_args(reg, **{"train.steps": 2, **overrides}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tessera: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(message, errors[0]), errors[0]
    ckpts = tmp_path / "w" / "checkpoints"
    assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


def test_scores_are_the_target_log_likelihood(reg, tmp_path):
    """SeqioEvaluator's score of a document = the model's summed log-probability of its target
    tokens, computed directly."""
    import jax
    import jax.numpy as jnp

    from tessera.train.seqio_eval import SeqioEvaluator
    from tessera.train.trainer import Trainer

    cfg = load_config("llama:tiny")
    for item in seqio_args(reg, **{"data.global_batch_size": 2, "data.seq_len": 16}):
        key, value = item[len("--config."):].split("=", 1)
        section, name = key.split(".")
        cfg[section][name] = type(cfg[section][name])(value) if value != "False" else False
    trainer = Trainer(cfg, str(tmp_path))
    params = trainer.init_state()["params"]
    docs = [np.array([5, 9, 1, 7, 8, 1], np.int32), np.array([4, 6, 1, 9, 1], np.int32),
            np.array([11, 1, 12, 13, 1], np.int32)]  # 3 docs: two batches of 2 rows
    starts = [3, 3, 2]
    got = SeqioEvaluator(trainer)._scores(params, docs, starts)
    model = trainer.spec.merge(params)
    for doc, start, score in zip(docs, starts, got):
        logits = model(jnp.asarray(doc[None, :-1])).logits[0].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        want = sum(float(logp[i - 1, doc[i]]) for i in range(start, len(doc)))
        np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-4)
