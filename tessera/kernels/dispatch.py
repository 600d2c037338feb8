"""The impl check every kernel dispatch shares: a name it knows, and no Pallas kernel promised
before it exists."""

from __future__ import annotations

from collections.abc import Sequence

PALLAS_IMPLS = ("pallas_tpu", "pallas_gpu")


def check_impl(op: str, impl: str, impls: Sequence[str], written: Sequence[str] = ()) -> None:
    """ValueError for an ``impl`` not in ``impls``; NotImplementedError for a Pallas impl that is
    not in ``written`` yet (named impls fail loudly, never degrade)."""
    if impl not in impls:
        raise ValueError(f"unknown {op} impl {impl!r}; valid: {', '.join(impls)}")
    if impl in PALLAS_IMPLS and impl not in written:
        usable = ", ".join(repr(i) for i in impls if i not in PALLAS_IMPLS or i in written)
        raise NotImplementedError(
            f"{op} impl {impl!r} is not available yet (no Pallas {op} kernel has been written); "
            f"use {usable}"
        )
