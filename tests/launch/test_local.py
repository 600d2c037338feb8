"""``python -m tessera.launch local`` and the environment contract of ``tessera.distributed``
(the real two-process runs are in tests/multiprocess)."""

from __future__ import annotations

import io
import sys

import pytest

from tessera import distributed
from tessera.launch import local


def test_process_env_sets_the_contract_and_replaces_the_device_count():
    base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "A": "b"}
    env = local.process_env(base, 1, 2, 1234, cpu_devices=4)
    assert env[distributed.COORDINATOR] == "localhost:1234"
    assert env[distributed.NUM_PROCESSES] == "2" and env[distributed.PROCESS_ID] == "1"
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["A"] == "b"
    assert "JAX_PLATFORMS" not in local.process_env({}, 0, 2, 1, cpu_devices=None)


def _script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_output_is_prefixed_logged_and_the_first_failure_is_the_exit_code(tmp_path):
    code = ("import os, sys, time; i = int(os.environ['TESSERA_PROCESS_ID']); print('hi', i); "
            "time.sleep(0.2 * i); sys.exit(5 + i if i else 0)")
    out = io.StringIO()
    run = local.start(_script(code), num_processes=3, log_dir=str(tmp_path), out=out, grace_s=5)
    assert run.wait() == 6  # process 1 failed first
    text = out.getvalue()
    for i in range(3):
        assert f"[p{i}] hi {i}\n" in text
        assert (tmp_path / f"process-{i}.log").read_text() == f"hi {i}\n"


def test_the_others_are_killed_after_the_grace_period():
    code = ("import os, sys, time; i = int(os.environ['TESSERA_PROCESS_ID']); "
            "sys.exit(3) if i else time.sleep(60)")
    out = io.StringIO()
    run = local.start(_script(code), num_processes=2, out=out, grace_s=0.5)
    assert run.wait() == 3
    assert run.procs[0].returncode != 0  # killed while it waited


@pytest.mark.parametrize(
    "env, message",
    [
        ({distributed.COORDINATOR: "h:1"}, "TESSERA_NUM_PROCESSES, TESSERA_PROCESS_ID must be set"),
        ({distributed.COORDINATOR: "h:1", distributed.NUM_PROCESSES: "two",
          distributed.PROCESS_ID: "0"}, "must be integers"),
        ({distributed.COORDINATOR: "h:1", distributed.NUM_PROCESSES: "2",
          distributed.PROCESS_ID: "2"}, r"must be in \[0, TESSERA_NUM_PROCESSES=2\)"),
    ],
)
def test_bad_environment_is_one_clear_error(monkeypatch, env, message):
    for key in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.requested()
    with pytest.raises(ValueError, match=message):
        distributed.explicit_args()


def test_nothing_requested_is_one_process(monkeypatch):
    for key in (distributed.DISTRIBUTED, distributed.COORDINATOR, distributed.NUM_PROCESSES,
                distributed.PROCESS_ID):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.requested() and not distributed.initialize()
    monkeypatch.setenv(distributed.DISTRIBUTED, "0")
    assert not distributed.requested()


def test_cli_without_a_command_is_one_line(capsys):
    from tessera.launch.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["local", "--num_processes=2"])
    assert e.value.code == 2
    assert "no command to launch" in capsys.readouterr().err
