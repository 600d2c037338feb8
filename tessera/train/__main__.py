"""``python -m tessera.train --config=llama:tiny --workdir=DIR [--config.train.steps=N ...]``.

Re-running the same command resumes from the latest checkpoint in DIR.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from tessera.cli import check_workdir, fail, run_main

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config: a packaged name (llama:tiny) or path/to/file.py[:arg].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        fail("--config is required (e.g. --config=llama:tiny)")
    if not _WORKDIR.value:
        fail("--workdir is required")
    check_workdir(_WORKDIR.value, write=True)
    from tessera.train.trainer import NonFiniteLossError, train

    try:
        train(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:
        fail(str(e), code=3)


if __name__ == "__main__":
    run_main(main)
