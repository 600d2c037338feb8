"""Shared command-line plumbing: ``--config=name:arg`` resolution and one-line errors."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tessera.configs import (
    format_override,
    load_config,
    lookup,
    parse_override,
    resolve_config_path,
)
from tessera.train.checkpoints import CheckpointError

if TYPE_CHECKING:
    import argparse


def _no_accelerator_here() -> bool:
    """No TPU (/dev/accel*, /dev/vfio/N) or NVIDIA GPU device node on this host."""
    import glob

    return not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*"))


def default_to_cpu_without_accelerators() -> None:
    """On a host with no accelerator, use the CPU backend without probing for TPUs: with libtpu
    installed (``make test`` installs it to compile for TPU topologies) the probe prints several
    lines of initialisation errors to stderr. ``JAX_PLATFORMS``, when set, wins."""
    if "JAX_PLATFORMS" not in os.environ and _no_accelerator_here():
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:  # jax read the environment when imported; no backend is up yet
            sys.modules["jax"].config.update("jax_platforms", "cpu")


default_to_cpu_without_accelerators()

# Errors that come from the user's input: printed as one line, no traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, CheckpointError)


_OVERRIDE = re.compile(r"--?(no)?config\.([^=]+)(=.*)?", re.DOTALL)
_SPEC = ("--config", "-config")
_SPEC_EQ = ("--config=", "-config=")


def config_args(argv: Sequence[str]) -> list[str]:
    """Check ``--config`` and its overrides before absl sees them; return the argv for absl.

    The config is loaded and each ``--config.a.b=v`` (also ``--config.a.b v``, and
    ``--config.flag`` / ``--noconfig.flag`` for bools) is parsed by ``parse_override``, the
    parser of the ``name:preset,a.b=v`` form, so a bad file, preset, key or value fails here as
    one line. absl gets ``--config=/path/file.py:arg`` first, then each override once (the last
    given wins) as the text of the value we parsed, so its config equals ``load_config``'s.
    """
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:end], argv[end:]
    spec = None
    for i, arg in enumerate(head):
        if arg in _SPEC and i + 1 < len(head):
            spec = head[i + 1]
        elif arg.startswith(_SPEC_EQ):
            spec = arg.split("=", 1)[1]
    if spec is None:
        return argv
    config = load_config(spec)
    rest, overrides = head[:1], {}
    args = iter(head[1:])
    for arg in args:
        if arg in _SPEC:
            next(args, None)
        elif not arg.startswith(_SPEC_EQ):
            if not (match := _OVERRIDE.fullmatch(arg)):
                rest.append(arg)
                continue
            negated, key, value = match.groups()
            if negated:
                value = "false"
            elif value is not None:
                value = value[1:]
            elif isinstance(lookup(config, key), bool):
                value = "true"
            elif (value := next(args, None)) is None:
                raise ValueError(f"--config.{key} needs a value")
            overrides.pop(key, None)
            overrides[key] = parse_override(config, key, value)
    absl_overrides = [f"--config.{key}={format_override(v)}" for key, v in overrides.items()]
    return [*rest[:1], f"--config={resolve_config_path(spec)}", *absl_overrides, *rest[1:], *tail]


def config_overrides(parser: argparse.ArgumentParser, rest: Sequence[str]) -> dict[str, str]:
    """``--config.a.b=v`` arguments an argparse tool left over -> ``{"a.b": "v"}``; anything else
    is a parser error naming it."""
    out = {}
    for item in rest:
        if not (item.startswith("--config.") and "=" in item):
            parser.error(f"unrecognized argument {item!r} (overrides look like --config.a.b=v)")
        key, value = item[len("--config."):].split("=", 1)
        out[key] = value
    return out


def check_workdir(path: str, *, write: bool) -> None:
    """Raise a one-line error unless ``path`` is a directory: one that training can create and
    write (``write``), or an existing one to read."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"workdir {path} is not a directory")
    if not write:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"workdir {path} does not exist")
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create workdir {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"workdir {path} is not writable")


def fail(message: str, code: int = 2) -> None:
    print(f"tessera: error: {message}", file=sys.stderr)
    sys.exit(code)


def run_main(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
    """``absl.app.run`` with the config flag rewritten and user errors shown as one line."""
    from absl import app

    argv = list(sys.argv if argv is None else argv)
    try:
        argv = config_args(argv)
    except USER_ERRORS as e:
        fail(error_line(e))
    sys.argv = argv  # config_flags reads the override names from sys.argv, not app.run's argv

    def wrapped(args: list[str]) -> None:
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
        try:
            from tessera.distributed import initialize

            initialize()  # multi-process runs join here, before any other jax use
            main(args)
        except USER_ERRORS as e:
            fail(error_line(e))

    app.run(wrapped, argv=argv)


def error_line(e: BaseException) -> str:
    """The first line of an error, for a one-line message (a KeyError without its quotes)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return str(text).splitlines()[0] if str(text) else type(e).__name__
