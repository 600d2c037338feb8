"""``python -m tessera.launch local``: N processes of one command on this machine, joined by
``jax.distributed`` as the hosts of a pod are (each with its own CPU devices when asked).

Each process gets ``TESSERA_COORDINATOR`` / ``TESSERA_NUM_PROCESSES`` / ``TESSERA_PROCESS_ID``
(``tessera/distributed.py`` joins with them) and, with ``cpu_devices``, ``JAX_PLATFORMS=cpu`` and
``--xla_force_host_platform_device_count``. Output lines are prefixed ``[pI]`` and copied to
``log_dir/process-I.log`` when given. SIGTERM / SIGINT reaching the launcher go to every process
(as a scheduler stops every host); when one process exits with an error the others get
``grace_s`` seconds to finish, then are killed, since they would wait on it in a collective.
The exit code is the first failing process's (0 when all succeed).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from tessera.distributed import COORDINATOR, NUM_PROCESSES, PROCESS_ID

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(
    base: dict[str, str], index: int, count: int, port: int, cpu_devices: int | None
) -> dict[str, str]:
    """The environment of process ``index`` of ``count``."""
    env = dict(base)
    env.update({COORDINATOR: f"localhost:{port}", NUM_PROCESSES: str(count),
                PROCESS_ID: str(index)})
    if cpu_devices:
        flags = _DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclasses.dataclass
class LocalRun:
    """Started processes (``procs[i]`` is process i); ``wait()`` returns the exit code."""

    procs: list[subprocess.Popen]
    grace_s: float
    _pumps: list[threading.Thread]

    def signal(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def wait(self) -> int:
        first_failure: int | None = None
        deadline = None
        while [p.poll() for p in self.procs].count(None):  # polls every process
            failed = [p.returncode for p in self.procs if p.returncode not in (None, 0)]
            if failed and first_failure is None:
                first_failure = failed[0]
                deadline = time.monotonic() + self.grace_s
            if deadline is not None and time.monotonic() > deadline:
                for p in self.procs:
                    if p.poll() is None:
                        print(f"tessera.launch: killing process {self.procs.index(p)}: another "
                              f"process failed {self.grace_s:.0f} s ago", file=sys.stderr)
                        p.kill()
            time.sleep(0.1)
        for t in self._pumps:
            t.join()
        if first_failure is None:
            first_failure = next((p.returncode for p in self.procs if p.returncode), 0)
        return first_failure


def _pump(stream: TextIO, prefix: str, out: TextIO, log: TextIO | None) -> None:
    for line in stream:
        out.write(prefix + line)
        out.flush()
        if log is not None:
            log.write(line)
            log.flush()
    if log is not None:
        log.close()


def start(
    command: Sequence[str],
    *,
    num_processes: int,
    cpu_devices: int | None = None,
    log_dir: str | None = None,
    grace_s: float = 30.0,
    port: int | None = None,
    out: TextIO | None = None,
) -> LocalRun:
    """Start ``command`` as processes 0..num_processes-1 (see the module docstring)."""
    if not command:
        raise ValueError("no command to launch (give it after --)")
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if cpu_devices is not None and cpu_devices < 1:
        raise ValueError(f"--cpu_devices must be >= 1, got {cpu_devices}")
    out = sys.stdout if out is None else out
    port = port or free_port()
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    procs, pumps = [], []
    for i in range(num_processes):
        env = process_env(dict(os.environ), i, num_processes, port, cpu_devices)
        p = subprocess.Popen(
            list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1,
        )
        procs.append(p)
        log = open(os.path.join(log_dir, f"process-{i}.log"), "w") if log_dir else None
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out, log), daemon=True)
        t.start()
        pumps.append(t)
        print(f"tessera.launch: process {i} of {num_processes}: pid {p.pid}", file=out, flush=True)
    return LocalRun(procs, grace_s, pumps)


def run(command: Sequence[str], **kwargs) -> int:
    """``start`` and wait, forwarding SIGTERM / SIGINT to every process; the exit code."""
    launched = start(command, **kwargs)
    old = {s: signal.signal(s, lambda signum, _: launched.signal(signum))
           for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return launched.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
