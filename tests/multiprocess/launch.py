"""Run a command on 2 local processes × 4 CPU devices through ``python -m tessera.launch local``,
as the README shows (the tests' environment, with this checkout on PYTHONPATH)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = [sys.executable, "-m", "tessera.launch", "local", "--num_processes=2",
          "--cpu_devices=4", "--grace_s=10", "--"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, e.get("PYTHONPATH", "")) if p)
    return e


def popen(command: list[str]) -> subprocess.Popen:
    """The launcher running ``command``; its stdout (all processes' lines, prefixed) is a pipe."""
    return subprocess.Popen(
        [*LAUNCH, *command], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def run(command: list[str], timeout: float = 300) -> str:
    """Run to the end; the output; an AssertionError with the output if it failed."""
    p = popen(command)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}:\n{out[-4000:]}"
    return out
