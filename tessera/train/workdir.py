"""What a trainer keeps in its workdir besides checkpoints and metrics: the lock and the configs.

Lock: ``WORKDIR/.lock``, held with ``fcntl.flock`` while a trainer runs, so that a second trainer
on the same workdir is refused (``WorkdirHeldError``) instead of interleaving its metrics rows and
checkpoints with the first's. The flock, not the file, is the lock: the kernel drops it when the
holder exits however it exits (``kill -9`` included), so a file left behind with no flock on it
is a stale lock, which the next trainer takes over with a note. The file records the holder
(``pid``, ``host``, ``since``) for the messages; a clean exit empties it but never deletes it
(deleting would let two trainers lock two different files under one name).

Multi-host: only process 0 takes the lock. All processes of one run share the workdir, so a lock
per process would refuse the run's own processes; process 0 writes ``config.json`` and
``metrics.jsonl``, and every step is a collective, so when a second run's process 0 is refused
and exits, the other processes of that run stop with it (jax.distributed) before any step. On a
network filesystem the lock is as good as its flock support (NFSv4: yes).

Configs: ``config.json`` is the config of the latest (re)start, and ``configs/config-<step>.json``
keeps the config each (re)start began with at that step, so a changed config is never lost.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from tessera.configs.base import flat_items
from tessera.files import write_atomic

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CONFIG_HISTORY = "configs"


class WorkdirHeldError(RuntimeError):
    """Another live trainer holds the workdir's lock."""


def _holder(info: str) -> str:
    """``pid 12 on host h since 2025-01-01T00:00:00`` from the lock file's text."""
    try:
        d = json.loads(info)
        return f"pid {d['pid']} on host {d['host']} since {d['since']}"
    except (ValueError, TypeError, KeyError):
        return "an unknown process"  # it has not written its record yet


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


@contextlib.contextmanager
def hold_workdir(
    workdir: str, *, enabled: bool = True, note: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold ``WORKDIR/.lock`` for the body (a no-op when not ``enabled``: processes other than 0).

    Raises ``WorkdirHeldError`` naming the holder when a live process holds it; ``note`` gets a
    line when a stale lock (its holder died without releasing it) is taken over.
    """
    if not enabled:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"cannot create the lock file {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirHeldError(
                f"workdir {workdir} is in use by another trainer ({_holder(_read(fd))}); "
                "stop it or use another --workdir"
            ) from None
        previous = _read(fd)
        if previous:
            note(f"tessera: taking over the stale lock of {_holder(previous)} in {path} "
                 "(it exited without releasing it)")
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: an empty file is no stale lock
    finally:
        os.close(fd)  # drops the flock


def config_changes(workdir: str, config_json: str) -> list[str]:
    """``key old -> new`` for each field where ``config_json`` differs from ``WORKDIR/config.json``
    (the config the run last started with); empty when there is no readable saved config."""
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            old = flat_items(json.load(f))
    except (OSError, ValueError):
        return []
    new = flat_items(json.loads(config_json))
    changes = []
    for k in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
        if a != b:
            changes.append(f"{k} {_show(a)} -> {_show(b)}")
    return changes


_ABSENT = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _ABSENT else json.dumps(value)


def save_config(workdir: str, config_json: str, step: int) -> None:
    """Write ``config.json`` (the latest) and ``configs/config-<step>.json`` atomically."""
    os.makedirs(os.path.join(workdir, CONFIG_HISTORY), exist_ok=True)
    for name in (CONFIG_FILE, os.path.join(CONFIG_HISTORY, f"config-{step}.json")):
        write_atomic(os.path.join(workdir, name), config_json)
