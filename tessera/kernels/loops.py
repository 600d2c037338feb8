"""Kernel loops with a cost mode: `scan` is `jax.lax.scan`, fully unrolled inside `unrolled()`.

XLA's `cost_analysis()` counts a while loop's body once, whatever its trip count, so a program
whose work sits in tile or chunk loops reports a fraction of its FLOPs. Every sequence or tile
loop in `tessera.kernels` goes through `scan` here; a tool that wants the true count traces (and
compiles) the program inside ``with unrolled():``, where each such loop is unrolled into straight
line code. Numerics are the same either way; only the program's shape (and its compile time)
changes. The flag is read at trace time: a function jitted and traced outside the context keeps
its loops.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax

_state = threading.local()


def is_unrolled() -> bool:
    """Whether this thread is tracing inside `unrolled()`."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def unrolled() -> Iterator[None]:
    """Trace kernel loops fully unrolled (cost mode) while the context is active; nests."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
) -> tuple[Any, Any]:
    """`jax.lax.scan(f, init, xs, length, reverse)`, with ``unroll=True`` under `unrolled()`."""
    return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=is_unrolled())
