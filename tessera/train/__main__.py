"""``python -m tessera.train --config=llama:tiny --workdir=DIR [--config.train.steps=N ...]``.

Re-running the same command resumes from the latest checkpoint in DIR. Exit codes (README):
0 finished (or already finished), 2 user error, 3 non-finite loss, 75 workdir in use by another
trainer (retry later), 128 + signal when SIGTERM (143) / SIGINT (130) stopped it after saving.
"""

from __future__ import annotations

import sys

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

EXIT_NON_FINITE = 3
EXIT_WORKDIR_HELD = 75  # EX_TEMPFAIL: the workdir is busy; the same command may work later


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        fail("--config is required (e.g. --config=llama:tiny)")
    if not _WORKDIR.value:
        fail("--workdir is required")
    check_workdir(_WORKDIR.value, write=True)
    from tessera.train.trainer import NonFiniteLossError, train
    from tessera.train.workdir import WorkdirHeldError

    try:
        result = train(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:
        fail(str(e), code=EXIT_NON_FINITE)
    except WorkdirHeldError as e:
        fail(str(e), code=EXIT_WORKDIR_HELD)
    if result.interrupted:
        sys.exit(128 + result.stop_signal)  # as a shell reports a process killed by the signal


if __name__ == "__main__":
    run_main(main)
