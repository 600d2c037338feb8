"""A run on files (a jsonl glob mixed with parquet, first-fit packing) killed at step 3 resumes
with exactly the batches of an uninterrupted run."""

import os
import signal

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.train.trainer import train

from .helpers import tiny_config

ONE = jax.devices()[:1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(3)

    def doc():
        return " ".join("".join(rng.choice(list("abcdefgh"), size=rng.integers(1, 8)))
                        for _ in range(rng.integers(1, 12)))

    for i in range(3):
        (root / f"web-{i}.jsonl").write_text("".join(f'{{"text": "{doc()}"}}\n' for _ in range(40)))
    pq.write_table(pa.table({"text": [doc() for _ in range(60)]}), root / "code.parquet",
                   row_group_size=8)
    return root


def run(workdir, files, **kw):
    mixture = f"text:{files}/web-*.jsonl=2;text:{files}/code.parquet=1"
    cfg = tiny_config(
        f"data.source=mixture,data.mixture={mixture},data.packing=first_fit,data.pack_window=16,"
        "data.streams=4,train.steps=6,train.log_every=1,checkpoint.every=1",
        data=1,
    )
    return train(cfg, str(workdir), devices=ONE, **kw)


@pytest.mark.slow
def test_file_mixture_resumes_with_the_same_batches(files, tmp_path):
    whole = run(tmp_path / "whole", files)

    def kill_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = run(tmp_path / "cut", files, on_step=kill_at_3)
    second = run(tmp_path / "cut", files)
    assert first.interrupted and second.resumed_from == 3
    assert set(second.losses) == {4, 5, 6}
    assert second.losses == pytest.approx({s: whole.losses[s] for s in (4, 5, 6)}, rel=1e-6)
    assert len(set(whole.losses.values())) == 6  # different batches, different losses
