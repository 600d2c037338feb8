"""What the Trainer does for every task: evaluation rows, the EMA (extra train state) and the step
RNG. One short run is shared; it uses a task that also reports a draw from the step's RNG."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.train import tasks
from tessera.train.checkpoints import Checkpointer, CheckpointError
from tessera.train.ema import EMA
from tessera.train.metrics import MetricsWriter, read_metrics
from tessera.train.rng import eval_rng, step_rng
from tessera.train.trainer import Trainer, train

from .helpers import tiny_config

ONE = jax.devices()[:1]
DECAY = 0.5
RUN = (f"train.task=draw,train.steps=5,train.log_every=1,train.seed=7,train.ema_decay={DECAY},"
       "eval.every=2,eval.batches=2,checkpoint.every=1")


class DrawTask(tasks.LMTask):
    """The LM task, also reporting a uniform draw from its RNG (summed, not averaged)."""

    def loss(self, model, batch, rng, *, train=True):
        total, weight, sums = super().loss(model, batch, rng, train=train)
        return total, weight, {**sums, "draw": jax.random.uniform(rng)}

    def metrics(self, sums, weight):
        return {**super().metrics(sums, weight), "draw": sums["draw"]}


@pytest.fixture(autouse=True)
def draw_task(monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "draw", DrawTask)


def run(workdir, extra="", **kw):
    return train(tiny_config(f"{RUN},{extra}" if extra else RUN, data=1), str(workdir),
                 devices=ONE, **kw)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tasks.TASKS, "draw", DrawTask)
        workdir = tmp_path_factory.mktemp("full")
        draws = {}
        result = run(workdir, on_step=lambda s, m: draws.update({s: float(m["draw"])}))
    return str(workdir), result, draws


@pytest.mark.slow
def test_eval_rows_every_n_steps_and_at_the_end(full):
    workdir, result, _ = full
    evals = read_metrics(workdir, "eval")
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert [r["step"] for r in read_metrics(workdir, "train")] == [1, 2, 3, 4, 5]
    assert len(read_metrics(workdir)) == 8
    for row in evals:
        assert {"eval/loss", "eval/nll", "eval/accuracy", "eval/perplexity", "eval_ema/loss",
                "eval_ema/perplexity"} <= set(row)
        assert row["eval/perplexity"] == pytest.approx(np.exp(row["eval/nll"]), rel=1e-5)
        assert row["eval/loss"] == pytest.approx(row["eval/nll"])  # no z-loss, no aux losses
        # Every evaluation draws the same eval RNG for the same batches.
        expected = sum(float(jax.random.uniform(eval_rng(7, i))) for i in range(2))
        assert row["eval/draw"] == pytest.approx(expected, rel=1e-6)
    assert evals[0]["eval/loss"] > evals[-1]["eval/loss"]
    assert result.evals[5] == {k: v for k, v in evals[-1].items() if k != "step"}


@pytest.mark.slow
def test_step_rng_is_folded_from_seed_and_step(full, tmp_path):
    _, _, draws = full
    assert draws == pytest.approx({s: float(jax.random.uniform(step_rng(7, s))) for s in draws})
    assert len(set(draws.values())) == 5
    # Under gradient accumulation each micro-batch folds in its index.
    accum = {}
    run(tmp_path, "train.steps=2,eval.every=0,optim.grad_accum_steps=2",
        on_step=lambda s, m: accum.update({s: float(m["draw"])}))
    for step in (1, 2):
        expected = sum(float(jax.random.uniform(step_rng(7, step, i))) for i in range(2))
        assert accum[step] == pytest.approx(expected, rel=1e-6)


def test_rng_streams_differ():
    keys = [step_rng(0, 1), step_rng(0, 2), step_rng(1, 1), step_rng(0, 1, 0), eval_rng(0, 0)]
    assert len({np.asarray(jax.random.key_data(k)).tobytes() for k in keys}) == len(keys)


@pytest.mark.slow
def test_ema_follows_its_formula(full):
    workdir, _, _ = full
    trainer = Trainer(tiny_config(RUN, data=1), workdir, ONE)
    assert trainer.state_shardings["ema"] == trainer.state_shardings["params"]
    ckpt = Checkpointer(workdir)
    states = {s: jax.device_get(ckpt.restore(s, trainer.abstract_state())[1]) for s in (3, 4, 5)}
    for step in (4, 5):
        ema = jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * p, states[step - 1]["ema"],
                           states[step]["params"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     states[step]["ema"], ema)
    lag = jax.tree.map(lambda e, p: np.abs(e - p).max(), states[5]["ema"], states[5]["params"])
    assert max(jax.tree.leaves(lag)) > 0


def test_ema_starts_at_the_params():
    params = {"w": jnp.arange(3.0), "b": {"c": jnp.ones(2)}}
    ema = EMA(0.9)
    start = ema.init(params)
    jax.tree.map(np.testing.assert_array_equal, start, params)
    moved = ema.update(start, jax.tree.map(lambda p: p + 1.0, params))
    jax.tree.map(lambda m, p: np.testing.assert_allclose(m, p + 0.1, rtol=1e-6), moved, params)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(full, tmp_path):
    workdir, result, _ = full

    def kill_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = run(tmp_path, on_step=kill_at_3)
    second = run(tmp_path)
    assert first.interrupted and second.resumed_from == 3
    assert second.losses == pytest.approx({s: result.losses[s] for s in (4, 5)}, rel=1e-6)
    for step in (2, 4, 5):
        run_evals = (first if step <= 3 else second).evals
        assert run_evals[step] == pytest.approx(result.evals[step], rel=1e-6)
    trainer = Trainer(tiny_config(RUN, data=1), str(tmp_path), ONE)
    _, a, _ = Checkpointer(workdir).restore(5, trainer.abstract_state())
    _, b, _ = Checkpointer(str(tmp_path)).restore(5, trainer.abstract_state())
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                 jax.device_get(a["ema"]), jax.device_get(b["ema"]))
    # A run without an EMA refuses the checkpoint rather than drop its state.
    with pytest.raises(CheckpointError, match="unexpected 'ema' state"):
        run(tmp_path, "train.steps=6,train.ema_decay=0.0")


@pytest.mark.slow
def test_evaluation_reads_the_same_held_out_batches(full):
    workdir, _, _ = full
    trainer = Trainer(tiny_config(RUN, data=1), workdir, ONE)
    _, state, _ = Checkpointer(workdir).restore(5, trainer.abstract_state())
    assert trainer.evaluate(state) == trainer.evaluate(state)
    train_batch = next(trainer.task.make_data("train"))
    eval_batch = next(trainer.task.make_data("eval"))
    assert not np.array_equal(train_batch["inputs"], eval_batch["inputs"])


def test_eval_source_names_another_source(tmp_path):
    docs = tmp_path / "train.txt"
    docs.write_text("a training line\n" * 40)
    cfg = tiny_config(f"data.source=text,data.path={docs},eval.source=synthetic", data=1)
    task = Trainer(cfg, str(tmp_path), ONE).task
    text = task.tokenizer.decode(next(task.make_data("eval"))["inputs"][0])
    assert "=" in text and "training" not in text  # synthetic examples, not the text file


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \[0, 1\), got 1.0"):
        Trainer(tiny_config("train.ema_decay=1.0", data=1), str(tmp_path), ONE)
    with pytest.raises(ValueError, match="eval.every must be >= 0"):
        Trainer(tiny_config("eval.every=-1", data=1), str(tmp_path), ONE)


def test_tensorboard_tags(tmp_path):
    tags = []
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.tb = type("TB", (), {"add_scalar": lambda self, tag, v, step: tags.append(tag),
                                "close": lambda self: None})()
    writer.write(1, {"loss": 1.0, "aux/moe_balance_loss": 0.1})
    writer.write_eval(1, {"eval/loss": 1.0, "eval_ema/loss": 2.0})
    assert tags == ["train/loss", "train/aux/moe_balance_loss", "eval/loss", "eval_ema/loss"]
    with pytest.raises(ValueError, match="an eval row needs 'eval/loss'"):
        writer.write_eval(2, {"loss": 1.0})


@pytest.mark.slow
def test_load_params_reads_the_ema_by_key(full, tmp_path):
    """Samplers read the EMA the way decode reads the parameters: ``load_params(key="ema")``."""
    from tessera.models.create import abstract_arrays
    from tessera.train.checkpoints import load_params

    workdir, _, _ = full
    trainer = Trainer(tiny_config(RUN, data=1), workdir, ONE)
    _, state, _ = Checkpointer(workdir).restore(5, trainer.abstract_state())
    target = abstract_arrays(trainer.spec.shapes, trainer.state_shardings["params"])
    step, ema = load_params(workdir, target, key="ema")
    assert step == 5
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ema), jax.device_get(state["ema"]))
    _, params = load_params(workdir, target)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(state["params"]))
    plain = tmp_path / "plain"
    run(plain, "train.steps=1,train.ema_decay=0.0,eval.every=0")
    with pytest.raises(CheckpointError, match="has no 'ema' state"):
        load_params(str(plain), target, key="ema")
