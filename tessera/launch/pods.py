"""The commands that start one command on every host of a TPU pod, as argv lists.

``TpuVm``: plain TPU VMs through ``gcloud compute tpus tpu-vm``. ``setup_commands`` ships
``git archive HEAD`` to every worker and installs it in ``DIR/.venv`` (python3.12 when present)
from ``requirements.lock``, the tested versions. ``start_commands`` starts the command detached on
every worker (``nohup``: closing the laptop does not stop training) with ``TESSERA_DISTRIBUTED=1``,
so each process joins through ``jax.distributed.initialize()``'s TPU auto-detection, and its output
goes to ``DIR/logs/train-<time>.log`` on its own host (``logs/latest.log`` links the newest, the
process id is in ``logs/train.pid``). ``follow_command`` prints host 0's log until its process
ends; ``stop_command`` sends SIGTERM on every worker (tessera saves a checkpoint and exits) and
waits for the processes to end.

``Xpk``: GKE through ``xpk workload create``, with an image built from ``tools/Dockerfile``.
Deleting the workload is the stop (its pods get SIGTERM, then ``grace_s`` seconds to save).

Nothing here runs anything: ``run`` executes the lists, ``format_commands`` prints them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tessera.distributed import DISTRIBUTED

REPO_ROOT = Path(__file__).resolve().parents[2]
REMOTE_TARBALL = "/tmp/tessera-src.tar.gz"
PID_FILE = "logs/train.pid"
LATEST_LOG = "logs/latest.log"
XPK_CONTAINER = "jax-tpu"  # xpk's --docker-name default: the main container of each pod
INSTALL_HINTS = {
    "gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)",
    "xpk": "pip install xpk (https://github.com/AI-Hypercomputer/xpk)",
    "kubectl": "gcloud components install kubectl",
    "git": "install git",
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` -> ``{"K": "V"}``; ValueError naming a malformed item."""
    env = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not _ENV_NAME.fullmatch(key):
            raise ValueError(f"--env {item!r} is not NAME=VALUE")
        env[key] = value
    return env


def remote_path(path: str) -> str:
    """``path`` quoted for the remote shell, leaving a leading ``~`` to expand there."""
    if path == "~":
        return path
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


@dataclasses.dataclass(frozen=True)
class TpuVm:
    """A TPU VM (a slice: one worker per host) and ``root``, tessera's directory on each host."""

    name: str
    zone: str
    project: str | None = None
    root: str = "~/tessera"

    def gcloud(self, verb: str, *args: str) -> list[str]:
        """``gcloud compute tpus tpu-vm VERB ARGS --zone=... [--project=...]``."""
        scope = [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *scope]

    def ssh(self, script: Sequence[str], worker: str = "all") -> list[str]:
        """Run the shell statements ``script`` (joined by ``;``) on ``worker`` (``all``, ``0``)."""
        return self.gcloud("ssh", self.name, f"--worker={worker}", f"--command={'; '.join(script)}")


def setup_commands(vm: TpuVm, *, local_tarball: str | None = None) -> list[list[str]]:
    """Ship the committed tree (``git archive HEAD``) to every worker, unpack it in ``vm.root``
    and install it into ``vm.root/.venv`` (kept when there): ``requirements.lock`` then tessera
    without deps, or ``pip install -e .[tpu]`` where the tree has no lock file or the host's
    python is not 3.12."""
    local_tarball = local_tarball or os.path.join(tempfile.gettempdir(), "tessera-src.tar.gz")
    d = remote_path(vm.root)
    pip = ".venv/bin/python -m pip install --quiet"
    install = (  # the lock pins what make test ran on CPython 3.12 (Linux x86-64, as TPU hosts)
        'if [ -f requirements.lock ] && .venv/bin/python -c "import sys;'
        ' sys.exit(sys.version_info[:2] != (3, 12))"; then'
        f' {pip} -r requirements.lock && {pip} --no-deps -e ".[tpu]";'
        ' else echo "tessera: no requirements.lock for this python: installing unpinned";'
        f' {pip} -e ".[tpu]"; fi'
    )
    return [
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz", f"--output={local_tarball}",
         "HEAD"],
        vm.gcloud("scp", local_tarball, f"{vm.name}:{REMOTE_TARBALL}", "--worker=all"),
        vm.ssh([
            "set -e",
            f"mkdir -p {d}",
            f"cd {d}",
            f"tar -xzf {REMOTE_TARBALL}",
            f"rm -f {REMOTE_TARBALL}",
            "PY=$(command -v python3.12 || command -v python3)",
            '"$PY" -c "import sys; sys.exit(sys.version_info < (3, 11))" || { echo "tessera:'
            ' $($PY -V) on $(hostname) is older than 3.11: install python3.12" >&2; exit 1; }',
            'test -x .venv/bin/python || "$PY" -m venv .venv',
            f"{pip} --upgrade pip",
            install,
        ]),
    ]


def start_script(root: str, command: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The shell statements that start ``command`` detached in ``root`` on one host (module
    docstring), refusing while the last run there is still going."""
    if not command:
        raise ValueError("no command to launch (give it after --)")
    assignments = [f"{k}={shlex.quote(v)}" for k, v in {DISTRIBUTED: "1", **env}.items()]
    return [
        f"cd {remote_path(root)} || exit 1",
        "mkdir -p logs",
        f'if [ -f {PID_FILE} ] && kill -0 "$(cat {PID_FILE})" 2>/dev/null; then echo "tessera:'
        f' a run is still going on $(hostname) (pid $(cat {PID_FILE})); stop it first" >&2;'
        " exit 1; fi",
        "log=logs/train-$(date +%Y%m%d-%H%M%S).log",
        f'ln -sfn "${{log#logs/}}" {LATEST_LOG}',
        'export PATH="$PWD/.venv/bin:$PATH" PYTHONUNBUFFERED=1',
        f'{" ".join(assignments)} nohup {shlex.join(command)} > "$log" 2>&1 < /dev/null'
        f" & echo $! > {PID_FILE}",
    ]


def follow_script(root: str, lines: int = 200) -> list[str]:
    """Print the newest log of this host (its last ``lines``, then as it grows) until the run's
    process ends."""
    return [f"cd {remote_path(root)} || exit 1",
            f'tail -n {lines} -F --pid="$(cat {PID_FILE})" {LATEST_LOG}']


def stop_script(root: str) -> list[str]:
    """SIGTERM to the run on this host, then wait until it has saved and exited."""
    return [
        f"cd {remote_path(root)} || exit 1",
        f"pid=$(cat {PID_FILE})",
        'kill -TERM "$pid" 2>/dev/null || exit 0',
        'while kill -0 "$pid" 2>/dev/null; do sleep 1; done',
        'echo "tessera: run stopped on $(hostname)"',
    ]


def start_commands(
    vm: TpuVm, command: Sequence[str], *, env: Mapping[str, str] | None = None, follow: bool = True
) -> list[list[str]]:
    """Start ``command`` on every worker, then (``follow``) watch worker 0's log."""
    starts = [vm.ssh(start_script(vm.root, command, env or {}))]
    return starts + ([follow_command(vm)] if follow else [])


def follow_command(vm: TpuVm) -> list[str]:
    return vm.ssh(follow_script(vm.root), worker="0")


def stop_command(vm: TpuVm) -> list[str]:
    return vm.ssh(stop_script(vm.root))


@dataclasses.dataclass(frozen=True)
class Xpk:
    """An xpk workload on a GKE cluster."""

    cluster: str
    workload: str
    project: str | None = None
    zone: str | None = None

    def xpk(self, verb: str, *args: str) -> list[str]:
        """``xpk workload VERB --cluster=... --workload=... [--project] [--zone] ARGS``."""
        scope = [f"--project={self.project}"] if self.project else []
        scope += [f"--zone={self.zone}"] if self.zone else []
        return ["xpk", "workload", verb, f"--cluster={self.cluster}",
                f"--workload={self.workload}", *scope, *args]


def xpk_create_command(
    w: Xpk,
    command: Sequence[str],
    *,
    tpu_type: str,
    docker_image: str,
    num_slices: int = 1,
    env: Mapping[str, str] | None = None,
    max_restarts: int = 0,
    grace_s: int = 300,
) -> list[str]:
    """``xpk workload create`` running ``command`` in ``docker_image`` on every host of
    ``num_slices`` slices of ``tpu_type``, with ``TESSERA_DISTRIBUTED=1``. xpk writes the command
    into a YAML block, so it must be one line."""
    if not command:
        raise ValueError("no command to launch (give it after --)")
    if any("\n" in arg for arg in command):
        raise ValueError("xpk takes a one-line command: an argument holds a newline")
    if num_slices < 1:
        raise ValueError(f"--num_slices must be >= 1, got {num_slices}")
    envs = [f"--env={k}={v}" for k, v in {DISTRIBUTED: "1", **(env or {})}.items()]
    return w.xpk(
        "create", f"--tpu-type={tpu_type}", f"--num-slices={num_slices}",
        f"--docker-image={docker_image}", *envs, f"--max-restarts={max_restarts}",
        f"--termination-grace-period-seconds={grace_s}", f"--command={shlex.join(command)}",
    )


def xpk_logs_command(w: Xpk) -> list[str]:
    """``kubectl logs -f`` of host 0 of slice 0 (the JobSet's labels; xpk's workload create
    points kubectl at the cluster)."""
    selector = (f"jobset.sigs.k8s.io/jobset-name={w.workload},jobset.sigs.k8s.io/job-index=0,"
                "batch.kubernetes.io/job-completion-index=0")
    return ["kubectl", "logs", "-f", "--tail=200", "-l", selector, "-c", XPK_CONTAINER]


def xpk_delete_command(w: Xpk) -> list[str]:
    return w.xpk("delete")


def format_commands(commands: Sequence[Sequence[str]]) -> str:
    """One shell line per command, to copy and paste."""
    return "".join(shlex.join(c) + "\n" for c in commands)


def check_tools(commands: Sequence[Sequence[str]]) -> None:
    """FileNotFoundError naming the first program of ``commands`` not on PATH and what to
    install."""
    for c in commands:
        if shutil.which(c[0]) is None:
            hint = INSTALL_HINTS.get(c[0], f"install {c[0]}")
            raise FileNotFoundError(f"{c[0]} not found on PATH: {hint}")


def run(commands: Sequence[Sequence[str]]) -> int:
    """Run ``commands`` one after another; the first non-zero exit code, or 0."""
    check_tools(commands)
    for c in commands:
        code = subprocess.run(list(c)).returncode
        if code:
            return code
    return 0
