"""Checkpoint integrity: damaged steps are detected and named, training falls back to the newest
intact step with the uninterrupted run's losses, decode refuses a damaged step in one line."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import pytest

from tessera.train.checkpoints import (
    MANIFEST,
    Checkpointer,
    CheckpointError,
    DamagedCheckpointError,
    load_params,
)
from tessera.train.metrics import read_metrics
from tessera.train.trainer import Trainer, train

from .helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Async saves (the default): manifests must wait for each save to be committed.
RUN = (
    "train.steps=6,checkpoint.every=2,checkpoint.keep=3,train.log_every=1,checkpoint.async_save=True"
)
ONE = jax.devices()[:1]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run: checkpoints at steps 2, 4 and 6."""
    workdir = str(tmp_path_factory.mktemp("full"))
    return workdir, train(tiny_config(RUN, data=1), workdir, devices=ONE)


@pytest.fixture(scope="module")
def target(full):
    return Trainer(tiny_config(RUN, data=1), full[0], ONE).abstract_state()


def _copy(full, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(full[0], workdir)
    return workdir


def _biggest(workdir: str, step: int) -> str:
    """The largest array-data file of ``step``, relative to the workdir."""
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
    return os.path.relpath(max(files, key=os.path.getsize), workdir)


def _overwrite(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(64)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_every_saved_step_has_a_manifest_that_verifies(full, target):
    workdir, result = full
    ckpt = Checkpointer(workdir)
    assert ckpt.all_steps() == [2, 4, 6]
    for step in (2, 4, 6):
        with open(os.path.join(workdir, "checkpoints", str(step), MANIFEST)) as f:
            files = json.load(f)["files"]
        assert "state/_METADATA" in files and "data_by_process/process_0-of-1.json" in files
    assert ckpt.restore(6, target)[0] == 6


DAMAGES = {
    "truncated": (lambda w: _biggest(w, 6), lambda p: os.truncate(p, os.path.getsize(p) // 2),
                  r"\d+ bytes, \d+ when saved"),
    "deleted": (lambda w: _biggest(w, 6), os.remove, "missing"),
    "missing metadata": (lambda w: "checkpoints/6/state/_METADATA", os.remove, "missing"),
    "overwritten": (lambda w: _biggest(w, 6), _overwrite, "sha256 mismatch"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damage_is_detected_naming_step_and_file(full, target, tmp_path, damage):
    workdir = _copy(full, tmp_path)
    pick, hurt, what = DAMAGES[damage]
    rel = pick(workdir)
    hurt(os.path.join(workdir, rel))
    ckpt = Checkpointer(workdir)
    message = re.escape(f"checkpoint step 6 in {workdir}/checkpoints is damaged ({rel}: ")
    with pytest.raises(DamagedCheckpointError, match=f"^{message}{what}\\)$"):
        ckpt.restore(None, target)
    # Decode reads only the parameters, through the same check, and says which steps remain.
    with pytest.raises(DamagedCheckpointError, match=r"another with --step \(saved: \[2, 4\]\)"):
        load_params(workdir, target["params"])


def test_step_without_manifest_is_verified_by_loading(full, target, tmp_path):
    workdir = _copy(full, tmp_path)
    os.remove(os.path.join(workdir, "checkpoints", "6", MANIFEST))
    assert Checkpointer(workdir).restore(6, target)[0] == 6  # readable: intact
    os.truncate(os.path.join(workdir, _biggest(workdir, 6)), 100)
    with pytest.raises(DamagedCheckpointError, match=rf"checkpoint step 6 in .* is damaged "
                                                     rf"\(checkpoints/6 is unreadable and has no "
                                                     rf"{MANIFEST}: .*\)$"):
        Checkpointer(workdir).restore(6, target)


def test_all_damaged_is_an_error_and_nothing_moves(full, target, tmp_path):
    workdir = _copy(full, tmp_path)
    for step in (2, 4, 6):
        os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*: step 6 is damaged "
                                              r"\(checkpoints/6/state/_METADATA: missing\); "
                                              r"step 4 .*; step 2 "):
        Checkpointer(workdir).restore_intact(target)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_damaged_latest_falls_back_and_resumes_exactly(full, target, tmp_path, capfd):
    workdir = _copy(full, tmp_path)
    rel = _biggest(workdir, 6)
    _overwrite(os.path.join(workdir, rel))
    damaged_sha = _sha(os.path.join(workdir, rel))
    os.makedirs(os.path.join(workdir, "checkpoints", "damaged", "6"))  # an earlier casualty
    capfd.readouterr()
    again = train(tiny_config(RUN, data=1), workdir, devices=ONE)
    err = capfd.readouterr().err
    assert again.resumed_from == 4 and sorted(again.losses) == [5, 6]
    for step in (5, 6):
        assert again.losses[step] == pytest.approx(full[1].losses[step], rel=1e-6)
    assert (
        f"tessera: checkpoint step 6 in {workdir}/checkpoints is damaged ({rel}: sha256 mismatch); "
        "moved it to checkpoints/damaged/6.1; resuming from step 4"
    ) in err.splitlines()
    # The damaged files are kept unchanged; step 6 was saved afresh and verifies.
    moved = os.path.join(workdir, "checkpoints/damaged/6.1", os.path.relpath(rel, "checkpoints/6"))
    assert _sha(moved) == damaged_sha
    assert Checkpointer(workdir).all_steps() == [2, 4, 6]
    assert Checkpointer(workdir).restore(None, target)[0] == 6
    assert [r["step"] for r in read_metrics(workdir, "train")] == list(range(1, 7))


def test_decode_cli_from_a_damaged_checkpoint_is_one_line(full, tmp_path):
    workdir = _copy(full, tmp_path)
    rel = _biggest(workdir, 6)
    os.truncate(os.path.join(workdir, rel), 10)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.serve.decode", "--config=llama:tiny",
         f"--workdir={workdir}", "--prompt=1+1="],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tessera: error: checkpoint step 6 in {workdir}/checkpoints is damaged ({rel}: 10 bytes, "
        f"{os.path.getsize(os.path.join(full[0], rel))} when saved); pick another with --step "
        "(saved: [2, 4])"
    )
