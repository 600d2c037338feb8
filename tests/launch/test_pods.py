"""The pod launchers build the right gcloud / xpk commands; the scripts they send to the hosts
start, refuse a second start, follow and stop a run when bash runs them here."""

import contextlib
import ctypes
import json
import os
import shlex
import subprocess
import sys
import threading
import time

import pytest

from tessera.launch import pods
from tessera.launch.__main__ import main

VM = pods.TpuVm("my-tpu", "us-east5-a", project="my-proj", root="~/my dir")
COMMAND = ["python", "-m", "tessera.train", "--config=llama:8b", "--workdir=/mnt/gcs/runs/8b",
           "--config.data.path=it's a \"file\".txt"]


def _command_of(argv: list[str]) -> str:
    (arg,) = [a for a in argv if a.startswith("--command=")]
    return arg[len("--command="):]


def test_gcloud_scope_and_setup():
    assert pods.TpuVm("t", "z").gcloud("ssh", "t") == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z"]
    archive, scp, ssh = pods.setup_commands(VM, local_tarball="/tmp/src.tar.gz")
    assert archive == ["git", "-C", str(pods.REPO_ROOT), "archive", "--format=tar.gz",
                       "--output=/tmp/src.tar.gz", "HEAD"]
    assert scp[4:] == ["scp", "/tmp/src.tar.gz", f"my-tpu:{pods.REMOTE_TARBALL}", "--worker=all",
                       "--zone=us-east5-a", "--project=my-proj"]
    script = _command_of(ssh)
    assert ssh[4:7] == ["ssh", "my-tpu", "--worker=all"]
    assert "cd ~/'my dir'" in script  # ~ expands on the host, the space is quoted
    pip = ".venv/bin/python -m pip install --quiet"
    assert f'{pip} -r requirements.lock && {pip} --no-deps -e ".[tpu]"' in script
    assert f'installing unpinned"; {pip} -e ".[tpu]"' in script
    assert "python3.12" in script
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0  # it parses


def test_start_quotes_the_command_and_env():
    start, follow = pods.start_commands(VM, COMMAND, env={"XLA_FLAGS": "--a=1 --b=2"})
    script = _command_of(start)
    line = next(s for s in script.split("; ") if " nohup " in s)
    words = shlex.split(line)
    assert words[:3] == ["TESSERA_DISTRIBUTED=1", "XLA_FLAGS=--a=1 --b=2", "nohup"]
    assert words[3:3 + len(COMMAND)] == COMMAND
    assert start[6] == "--worker=all" and follow[6] == "--worker=0"
    assert "tail" in _command_of(follow)
    assert pods.start_commands(VM, COMMAND, env={"XLA_FLAGS": "--a=1 --b=2"},
                               follow=False) == [start]
    with pytest.raises(ValueError, match="no command"):
        pods.start_commands(VM, [])


def test_xpk_create_logs_delete():
    w = pods.Xpk("my-cluster", "llama-8b", project="my-proj", zone="us-east5-a")
    create = pods.xpk_create_command(
        w, COMMAND, tpu_type="v5p-64", docker_image="us-docker.pkg.dev/p/r/tessera:1",
        num_slices=2, env={"A": "b c"}, max_restarts=3, grace_s=120,
    )
    assert create[:3] == ["xpk", "workload", "create"]
    for flag in ("--cluster=my-cluster", "--workload=llama-8b", "--project=my-proj",
                 "--zone=us-east5-a", "--tpu-type=v5p-64", "--num-slices=2",
                 "--docker-image=us-docker.pkg.dev/p/r/tessera:1", "--env=TESSERA_DISTRIBUTED=1",
                 "--env=A=b c", "--max-restarts=3", "--termination-grace-period-seconds=120"):
        assert flag in create
    assert shlex.split(_command_of(create)) == COMMAND
    assert pods.xpk_delete_command(w) == ["xpk", "workload", "delete", "--cluster=my-cluster",
                                          "--workload=llama-8b", "--project=my-proj",
                                          "--zone=us-east5-a"]
    assert "jobset.sigs.k8s.io/jobset-name=llama-8b" in pods.xpk_logs_command(w)[5]
    with pytest.raises(ValueError, match="one-line"):
        pods.xpk_create_command(w, ["python", "-c", "a\nb"], tpu_type="v5p-8", docker_image="i")


def test_dry_run_prints_the_commands(capsys):
    argv = ["tpu-vm", "--tpu=my-tpu", "--zone=us-east5-a", "--project=my-proj", "--dir=~/my dir",
            "--env=XLA_FLAGS=--a=1 --b=2", "--dry_run", "--", *COMMAND]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    expected = pods.start_commands(VM, COMMAND, env={"XLA_FLAGS": "--a=1 --b=2"})
    assert [shlex.split(line) for line in lines] == expected
    with pytest.raises(SystemExit):
        main(["xpk", "--cluster=c", "--workload=w", "--tpu_type=v5p-64", "--num_slices=4",
              "--docker_image=img", "--dry_run", "--", *COMMAND])
    (line,) = capsys.readouterr().out.splitlines()
    assert "--num-slices=4" in shlex.split(line)


def test_run_stops_at_the_first_failure(monkeypatch, tmp_path):
    calls = tmp_path / "calls"
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 3\n')
    gcloud.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as e:  # start, then follow: the failed start ends it
        main(["tpu-vm", "--tpu=t", "--zone=z", "--", "python", "-m", "tessera.train"])
    assert e.value.code == 3
    (call,) = calls.read_text().splitlines()
    assert call.startswith("compute tpus tpu-vm ssh t --worker=all --command=cd ~/tessera")


@pytest.mark.parametrize("argv, message", [
    (["tpu-vm", "--tpu=t", "--zone=z", "--stop"], "gcloud not found on PATH: install the Google"),
    (["xpk", "--cluster=c", "--workload=w", "--stop"], "xpk not found on PATH: pip install xpk"),
    (["xpk", "--cluster=c", "--workload=w", "--", "python"], "--tpu_type and --docker_image"),
    (["tpu-vm", "--tpu=t", "--zone=z", "--setup", "--", "python"], "take no command"),
    (["tpu-vm", "--tpu=t", "--zone=z", "--env=1A=b", "--", "python"], "is not NAME=VALUE"),
])
def test_errors_are_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud, no xpk
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera: error: ") and message in err and err.count("\n") == 1


_WORKER = """
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("saved", flush=True), sys.exit(0)))
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                  "env": [os.environ.get(k) for k in ("TESSERA_DISTRIBUTED", "A")]}), flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def _subreaper():
    """Orphans (the detached run) become this process's children, so a thread can reap them:
    where PID 1 reaps nothing (containers), a dead run would otherwise look alive to kill -0."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        pytest.skip("no PR_SET_CHILD_SUBREAPER")
    try:
        yield
    finally:
        prctl(36, 0, 0, 0, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux hosts (prctl, /proc)")
def test_host_scripts_start_refuse_follow_stop(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    home_dir = "~/run dir"
    workdir = tmp_path / "run dir"
    workdir.mkdir()

    def bash(script, timeout=20):
        return subprocess.run(["bash", "-c", "; ".join(script)], env=env, capture_output=True,
                              text=True, timeout=timeout)

    command = [sys.executable, "-c", _WORKER, "a b", "it's", '"q"', "$HOME", "*"]
    with _subreaper():
        started = bash(pods.start_script(home_dir, command, {"A": "x 'y' $z"}))
        assert started.returncode == 0, started.stderr
        pid = int((workdir / pods.PID_FILE).read_text())
        threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()
        log = workdir / pods.LATEST_LOG
        deadline = time.monotonic() + 20
        while "argv" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the run wrote nothing"
            time.sleep(0.05)
        row = json.loads(log.read_text().splitlines()[0])
        assert row == {"argv": command[3:], "cwd": str(workdir), "env": ["1", "x 'y' $z"]}

        again = bash(pods.start_script(home_dir, command, {}))
        assert again.returncode == 1 and "still going" in again.stderr

        stopped = bash(pods.stop_script(home_dir))
        assert stopped.returncode == 0 and "run stopped" in stopped.stdout
        followed = bash(pods.follow_script(home_dir))  # the process has ended: prints, returns
    assert followed.returncode == 0
    assert followed.stdout.splitlines()[-1] == "saved"
