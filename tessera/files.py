"""Writing files so that a kill never leaves half of one: write a temporary file beside it, fsync,
then rename it over the target (atomic on POSIX)."""

from __future__ import annotations

import os


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8): readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
