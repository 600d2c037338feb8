"""One trainer per workdir: a live holder refuses a second trainer; a stale lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tessera.train.workdir import LOCK_FILE, WorkdirHeldError, hold_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A tiny LM that would train for a long time, logging and saving every step.
LONG_RUN = ["--config=llama:tiny", "--config.train.steps=100000", "--config.train.log_every=1",
            "--config.checkpoint.every=1", "--config.checkpoint.async_save=False",
            "--config.train.tensorboard=False", "--config.data.seq_len=32",
            "--config.data.global_batch_size=8", "--config.eval.every=0"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def start_train(workdir, *args, stderr=None):
    return subprocess.Popen([sys.executable, "-m", "tessera.train", f"--workdir={workdir}", *args],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)


def read_until(proc, prefix):
    """The stdout lines of ``proc`` up to and including the first that starts with ``prefix``."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    proc.wait()
    raise AssertionError(f"exited {proc.returncode} before {prefix!r}: {''.join(lines)}")


def test_hold_refuses_a_second_holder_and_empties_the_file_on_release(tmp_path):
    with hold_workdir(str(tmp_path)):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        # flock belongs to the open file, so a second open in this process conflicts too.
        with pytest.raises(WorkdirHeldError, match=f"pid {os.getpid()} on host "):
            with hold_workdir(str(tmp_path)):
                pass
    assert (tmp_path / LOCK_FILE).read_text() == ""
    notes = []
    with hold_workdir(str(tmp_path), note=notes.append):  # a clean release is not stale
        pass
    assert notes == []


def test_stale_lock_is_taken_over_with_a_note(tmp_path):
    record = {"pid": 999999, "host": "elsewhere", "since": "2025-01-01T00:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))  # no flock on it: its holder died
    notes = []
    with hold_workdir(str(tmp_path), note=notes.append):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    [note] = notes
    assert "stale lock of pid 999999 on host elsewhere since 2025-01-01T00:00:00" in note


def test_two_trainers_on_one_workdir(tmp_path):
    workdir = tmp_path / "run"
    first = start_train(workdir, *LONG_RUN, stderr=subprocess.DEVNULL)
    try:
        read_until(first, "step 2:")  # step 1's checkpoint is saved
        second = subprocess.run(
            [sys.executable, "-m", "tessera.train", f"--workdir={workdir}", *LONG_RUN],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 75, second.stderr
        assert "Traceback" not in second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("tessera: error:")]
        assert len(errors) == 1, second.stderr
        assert f"is in use by another trainer (pid {first.pid} on host {socket.gethostname()}" \
            in errors[0]
        assert os.listdir(workdir / "configs") == ["config-0.json"]  # the second wrote nothing
    finally:
        first.kill()  # kill -9: the flock goes with the process, the record stays
        first.wait()
    assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == first.pid

    third = start_train(workdir, *LONG_RUN, stderr=subprocess.DEVNULL)
    try:
        lines = read_until(third, "tessera: training")
        assert f"taking over the stale lock of pid {first.pid}" in "".join(lines)
        assert "resuming from step" in lines[-1] and "from step 0" not in lines[-1]
        read_until(third, "step ")
        third.send_signal(signal.SIGTERM)
        out, _ = third.communicate(timeout=300)
    finally:
        third.kill()
        third.wait()
    assert third.returncode == 143
    assert "tessera: SIGTERM received; saved checkpoint at step" in out
    assert (workdir / LOCK_FILE).read_text() == ""  # released cleanly
