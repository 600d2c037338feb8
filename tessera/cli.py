"""Shared command-line plumbing: ``--config=name:arg`` resolution and one-line errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from tessera.configs import load_config, resolve_config_path
from tessera.train.checkpoints import CheckpointError

# Errors that come from the user's input: printed as one line, no traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, CheckpointError)


def rewrite_config_flag(argv: Sequence[str]) -> list[str]:
    """Turn ``--config=llama:tiny`` into ``--config=/.../configs/llama.py:tiny`` for absl."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config_path(arg[len("--config=") :])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out


def check_config_overrides(argv: Sequence[str]) -> None:
    """Load the ``--config`` and apply its ``--config.a.b=v`` overrides once, so a misspelt key
    fails with one line naming it (absl would print a traceback)."""
    spec, overrides = None, {}
    for arg in argv:
        if arg.startswith("--config="):
            spec = arg[len("--config="):]
        elif arg.startswith("--config.") and "=" in arg:
            key, value = arg[len("--config."):].split("=", 1)
            overrides[key] = value
    if spec is not None and overrides:
        load_config(spec, overrides)


def maybe_initialize_distributed() -> None:
    """Multi-host runs (``TESSERA_DISTRIBUTED=1``): join the other processes before any jax use."""
    if os.environ.get("TESSERA_DISTRIBUTED", "") not in ("", "0"):
        import jax

        jax.distributed.initialize()


def fail(message: str, code: int = 2) -> None:
    print(f"tessera: error: {message}", file=sys.stderr)
    sys.exit(code)


def run_main(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
    """``absl.app.run`` with the config flag rewritten and user errors shown as one line."""
    from absl import app

    argv = list(sys.argv if argv is None else argv)
    try:
        argv = rewrite_config_flag(argv)
        check_config_overrides(argv)
    except USER_ERRORS as e:
        fail(_message(e))

    def wrapped(args: list[str]) -> None:
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
        try:
            maybe_initialize_distributed()
            main(args)
        except USER_ERRORS as e:
            fail(_message(e))

    app.run(wrapped, argv=argv)


def _message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return str(text).splitlines()[0] if str(text) else type(e).__name__
