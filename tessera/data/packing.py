"""Checkpointable packing of token documents into fixed-length rows, greedy or first-fit.

Both packers yield rows `{"tokens", "segment_ids", "positions"}`, each int32 [row_len]. A row
holds one or more pieces of documents, back to back from position 0, then padding (`pad_id`,
segment id 0). Each piece is its own segment: segment ids count 1, 2, 3... within a row and
positions restart at 0 for each piece, so positions stay below the row length. Empty documents
are skipped. Every token of every document lands in exactly one row, in order within its piece.

`PackIterDataset` (greedy) places documents in order. A document that fits in the current row's
free space goes there; one that does not but would fit an empty row closes the current row (the
rest is padding) and starts the next; one longer than a row is cut into pieces, the first filling
the current row's free space. Its state is the parent's state from just before the document that
is partly placed, plus how many of its tokens are already emitted, so a restored iterator re-reads
that document and continues from the same token.

`FirstFitPackIterDataset` reads a window of documents at a time (until they hold `window` rows'
worth of tokens, so a window's half-filled last row is a small share of it), cuts each longer than
a row into row-long pieces (the last one shorter), and places the pieces by first-fit decreasing:
longest first (ties in reading order), each into the first row with room, else into a new row. It
emits the window's rows in order of creation, then reads the next window. This wastes fewer slots
than greedy at the cost of reordering documents within a window. Its state is the parent's state at
the window's start plus how many of the window's rows are already emitted; a restored iterator
re-reads the window, packs it again and skips those rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

FIRST_FIT = "first_fit"  # tags a first-fit state so a foreign state is refused, not misread


def packing_efficiency(segment_ids: np.ndarray) -> float:
    """Fraction of slots that hold a real token (segment id != 0) in a row or batch of rows."""
    segment_ids = np.asarray(segment_ids)
    if segment_ids.size == 0:
        raise ValueError("packing_efficiency needs at least one slot, got an empty array")
    return float(np.count_nonzero(segment_ids)) / segment_ids.size


def _make_row(pieces: Sequence[np.ndarray], row_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One packed row from `pieces` (their total length <= `row_len`), each its own segment."""
    tokens = np.full(row_len, pad_id, np.int32)
    segment_ids = np.zeros(row_len, np.int32)
    positions = np.zeros(row_len, np.int32)
    used = 0
    for segment, piece in enumerate(pieces, start=1):
        n = len(piece)
        tokens[used : used + n] = piece
        segment_ids[used : used + n] = segment
        positions[used : used + n] = np.arange(n)
        used += n
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def _check_row_len(row_len: int) -> None:
    if row_len < 1:
        raise ValueError(f"row_len must be >= 1, got {row_len}")


class PackIterDataset(grain.IterDataset):
    """Greedy packing of 1-D int token arrays into rows `{"tokens", "segment_ids",
    "positions"}`, each int32 [row_len] (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, *, row_len: int, pad_id: int):
        super().__init__(parent)
        _check_row_len(row_len)
        self._row_len = row_len
        self._pad_id = pad_id

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._row_len, self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(row_len={self._row_len})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, row_len: int, pad_id: int):
        super().__init__(parent)
        self._row_len = row_len
        self._pad_id = pad_id
        self._doc: np.ndarray | None = None  # document not yet fully emitted
        self._offset = 0  # tokens of `_doc` already emitted
        self._doc_state: dict[str, Any] = {}  # parent state from just before `_doc`

    def _load_doc(self) -> bool:
        """Reads the next non-empty document into `_doc`; False when the parent is exhausted."""
        while True:
            state = self._parent.get_state()
            try:
                doc = np.asarray(next(self._parent))
            except StopIteration:
                return False
            if doc.size:
                self._doc, self._offset, self._doc_state = doc, 0, state
                return True

    def __next__(self) -> dict[str, np.ndarray]:
        n_row = self._row_len
        pieces: list[np.ndarray] = []
        used = 0
        while used < n_row:
            if self._doc is None and not self._load_doc():
                if used:
                    break
                raise StopIteration
            rest = len(self._doc) - self._offset
            free = n_row - used
            if free < rest <= n_row:
                break  # fits whole in the next row: do not split it
            n = min(rest, free)
            pieces.append(self._doc[self._offset : self._offset + n])
            used += n
            self._offset += n
            if self._offset == len(self._doc):
                self._doc = None
        return _make_row(pieces, n_row, self._pad_id)

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"parent", "offset"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a greedy packing state (keys 'parent', 'offset'): {keys}")
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["offset"]:
            if not self._load_doc():
                raise ValueError("packing state points past the end of its data")
            self._offset = int(state["offset"])


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices by first-fit decreasing: items longest first (ties by index), each
    into the first bin with room, else a new bin; bins in order of creation. Every length must be
    in [1, capacity]."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        got = f"{lengths.min()}..{lengths.max()}"
        raise ValueError(f"item lengths must be in [1, {capacity}], got {got}")
    free = np.empty(len(lengths), np.int64)  # free space per bin; at most one bin per item
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = lengths[i]
        fits = free[: len(bins)] >= n
        b = int(fits.argmax()) if len(bins) and fits.any() else len(bins)
        if b == len(bins):
            bins.append([])
            free[b] = capacity
        bins[b].append(int(i))
        free[b] -= n
    return bins


class FirstFitPackIterDataset(grain.IterDataset):
    """First-fit-decreasing packing of 1-D int token arrays into rows `{"tokens", "segment_ids",
    "positions"}`, each int32 [row_len] (see the module docstring), a window at a time: the
    documents that together hold `window` rows' worth of tokens (the last one crossing it).

    A window's last rows are the least filled, so a larger window packs tighter; it costs more
    memory per stream and more re-reading on restore (up to a window of documents). A finite
    parent's last window is emitted whole.
    """

    def __init__(self, parent: grain.IterDataset, *, row_len: int, pad_id: int, window: int):
        super().__init__(parent)
        _check_row_len(row_len)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._row_len = row_len
        self._pad_id = pad_id
        self._window = window

    def __iter__(self) -> _FirstFitPackIterator:
        return _FirstFitPackIterator(
            self._parent.__iter__(), self._row_len, self._pad_id, self._window
        )

    def __str__(self) -> str:
        return f"FirstFitPackIterDataset(row_len={self._row_len}, window={self._window})"


class _FirstFitPackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, row_len: int, pad_id: int, window: int):
        super().__init__(parent)
        self._row_len = row_len
        self._pad_id = pad_id
        self._window = window
        self._rows: list[list[np.ndarray]] = []  # the current window's rows, as pieces
        self._emitted = 0  # rows of `_rows` already emitted
        self._window_state: dict[str, Any] = parent.get_state()  # parent state at window start

    def _read_window(self) -> int:
        """Reads documents until they hold `window` rows' worth of tokens (or the parent ends)
        and packs them into `_rows`; returns how many it read (0: the parent is exhausted)."""
        self._window_state = self._parent.get_state()
        self._emitted = 0
        pieces: list[np.ndarray] = []
        n_docs = tokens = 0
        while tokens < self._window * self._row_len:
            try:
                doc = np.asarray(next(self._parent))
            except StopIteration:
                break
            n_docs += 1
            tokens += doc.size
            pieces.extend(doc[i : i + self._row_len] for i in range(0, doc.size, self._row_len))
        bins = first_fit_decreasing([len(p) for p in pieces], self._row_len)
        self._rows = [[pieces[i] for i in b] for b in bins]
        return n_docs

    def __next__(self) -> dict[str, np.ndarray]:
        while self._emitted == len(self._rows):  # (a window of only empty documents has no rows)
            if not self._read_window():
                raise StopIteration
        row = self._rows[self._emitted]
        self._emitted += 1
        return _make_row(row, self._row_len, self._pad_id)

    def get_state(self) -> dict[str, Any]:
        state = {"packing": FIRST_FIT, "window": self._window, "row_len": self._row_len}
        if self._emitted == len(self._rows):  # window done: the next starts where the parent is
            return state | {"parent": self._parent.get_state(), "rows_emitted": 0}
        return state | {"parent": self._window_state, "rows_emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("packing") != FIRST_FIT:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a first-fit packing state (no 'packing': '{FIRST_FIT}'): {keys}")
        if (state.get("window"), state.get("row_len")) != (self._window, self._row_len):
            raise ValueError(
                f"first-fit packing state is for window={state.get('window')}, "
                f"row_len={state.get('row_len')}; this packer has window={self._window}, "
                f"row_len={self._row_len}"
            )
        self._parent.set_state(state["parent"])
        self._rows, self._emitted = [], 0
        skip = int(state["rows_emitted"])
        if skip:
            self._read_window()
            if skip > len(self._rows):
                raise ValueError(
                    f"first-fit packing state skips {skip} rows of a window that packs into "
                    f"{len(self._rows)}: the data changed since it was saved"
                )
            self._emitted = skip
