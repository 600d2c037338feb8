"""Exit codes of ``python -m tessera.train`` (the README's table): SIGINT saves and exits 130,
re-running a finished run exits 0 doing nothing. SIGTERM (143) and a held workdir (75) are in
test_workdir_lock.py, user errors (2) in test_cli.py, a non-finite loss (3) in test_nan.py."""

import re
import signal
import subprocess

from .test_workdir_lock import LONG_RUN, read_until, start_train


def test_sigint_saves_and_exits_130_then_a_finished_rerun_exits_0(tmp_path):
    proc = start_train(tmp_path, *LONG_RUN, stderr=subprocess.DEVNULL)
    try:
        read_until(proc, "step ")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130
    step = int(re.search(r"SIGINT received; saved checkpoint at step (\d+)\.", out).group(1))

    args = [a for a in LONG_RUN if not a.startswith("--config.train.steps=")]
    rerun = start_train(tmp_path, *args, f"--config.train.steps={step}", stderr=subprocess.PIPE)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert out.splitlines() == [f"tessera: already finished at step {step}; nothing to do"]


def test_non_finite_loss_exits_3(tmp_path):
    args = [a for a in LONG_RUN if not a.startswith("--config.train.steps=")]
    proc = start_train(tmp_path, *args, "--config.train.steps=4", "--config.optim.warmup_steps=0",
                       "--config.optim.learning_rate=1e30", stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3
    assert err.splitlines()[-1].startswith("tessera: error: non-finite loss at step ")
