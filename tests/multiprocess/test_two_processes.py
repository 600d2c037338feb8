"""Two processes × 4 CPU devices (jax.distributed, gloo) against one process × 8 devices: the
train step, checkpoints across process counts, each process's data shard, decode."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest

from tessera.data.pipeline import shard_source
from tessera.serve.loading import load_decoder
from tessera.train.checkpoints import Checkpointer
from tessera.train.trainer import Trainer
from tests.multiprocess import launch
from tests.multiprocess.shared import PROMPT, config, flat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """(job output dir, the one-process trainer, its initial state): the job runs once."""
    out = tmp_path_factory.mktemp("two")
    trainer = Trainer(config(), str(out / "one"))
    state = trainer.init_state()
    ckpt = Checkpointer(str(out / "one"))
    data = trainer.task.make_data("train")
    next(data)
    ckpt.save(3, state, data.get_state())
    ckpt.close()
    launch.run([sys.executable, "-m", "tests.multiprocess.job", str(out), str(out / "one")])
    return out, trainer, state, dict(np.load(out / "results.npz"))


def _global_batch(out) -> dict[str, np.ndarray]:
    """Process 0's rows then process 1's: the global batch of the two-process step."""
    parts = [dict(np.load(out / f"batch-{i}.npz")) for i in range(2)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _close(got: dict, want: dict, prefix: str, **tol) -> None:
    for key, value in want.items():
        np.testing.assert_allclose(got[f"{prefix}/{key}"], value, err_msg=key, **tol)


def test_step_on_two_processes_equals_one_process(two):
    out, trainer, state, results = two
    batch = trainer.device_batch(_global_batch(out))
    loss, grads = trainer.grads(state["params"], batch)
    np.testing.assert_allclose(results["loss"], loss, rtol=1e-6)
    _close(results, flat(jax.device_get(grads)), "grads", rtol=1e-4, atol=1e-7)
    new, metrics = trainer.step(jax.tree.map(lambda x: x.copy(), state), batch)
    np.testing.assert_allclose(results["step_loss"], metrics["loss"], rtol=1e-6)
    # Adam's first update is about lr * sign(g): where |g| is near its eps, the summation order
    # of the two gradients moves the update by a few 1e-7.
    _close(results, flat(jax.device_get(new["params"])), "params", rtol=1e-5, atol=2e-6)


def test_checkpoint_saved_by_two_processes_restores_in_one(two):
    out, trainer, _, results = two
    step, state, data_state = Checkpointer(str(out / "work"), read_only=True).restore(
        None, trainer.abstract_state()
    )
    assert step == 1
    got = flat(jax.device_get(state["params"]))
    for key, value in got.items():
        np.testing.assert_array_equal(results[f"params/{key}"], value, err_msg=key)
    # Saved by 2 processes after 3 batches: this process takes both processes' stream positions
    # and reads the 4th batch next.
    assert len(data_state["saved_by_processes"]) == 2
    data = trainer.task.make_data("train")
    data.set_state(data_state)
    want = trainer.task.make_data("train")
    for _ in range(3):
        next(want)
    got = next(data)
    for key, value in next(want).items():
        np.testing.assert_array_equal(got[key], value, key)


def test_checkpoint_saved_by_one_process_restores_in_two(two):
    out, trainer, state, results = two
    for key, value in flat(jax.device_get(state["params"])).items():
        np.testing.assert_array_equal(results[f"restored/{key}"], value, err_msg=key)
    # Saved by one process after one batch: the two processes read the second batch next.
    data = trainer.task.make_data("train")
    next(data)
    parts = [dict(np.load(out / f"resumed-{i}.npz")) for i in range(2)]
    for key, value in next(data).items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, key)


def test_processes_batches_together_are_the_one_process_batch(two):
    """Each process reads only its streams: the two processes' rows differ, and process 0's
    rows then process 1's are the batch one process reads, batch after batch."""
    out, trainer, _, _ = two
    data = trainer.task.make_data("train")
    parts = [dict(np.load(out / f"more-{i}.npz")) for i in range(2)]
    for n, want in enumerate([next(data) for _ in range(3)]):
        got = _global_batch(out) if n == 0 else {
            k: np.concatenate([p[k][n - 1] for p in parts]) for k in parts[0]
        }
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"batch {n} {key}")
        rows = [{r.tobytes() for r in half} for half in np.split(got["inputs"], 2)]
        assert not rows[0] & rows[1]
    shards = [
        shard_source(list(range(10)), split="train", global_batch_size=8, process_index=i,
                     process_count=2, seed=0).docs
        for i in range(2)
    ]
    seen = [{int(shard[j]) for j in range(5)} for shard in shards]  # images and classify
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(10))


def test_evaluation_on_two_processes_equals_one(two):
    """Eval batches do not depend on the process count either; a process whose eval streams end
    first feeds zero-weight padding while the other still has batches."""
    _, trainer, state, results = two
    want = trainer.evaluate(state)
    assert want["eval/loss"] > 0
    for key, value in want.items():
        np.testing.assert_allclose(results[f"evaluation/{key}"], value, rtol=1e-5, err_msg=key)


def test_decode_on_two_processes_matches_one(two):
    out, trainer, _, _ = two
    tokens = [np.load(out / f"tokens-{i}.npy") for i in range(2)]
    decoder, _ = load_decoder(config(), str(out / "work"))
    want = decoder.generate([PROMPT], max_new_tokens=8, stop_tokens=())[0].tokens
    assert len(want) == 8
    for got in tokens:
        np.testing.assert_array_equal(got, want)
