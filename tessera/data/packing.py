"""Greedy, checkpointable packing of token documents into fixed-length rows.

Documents are placed in order. A document that fits in the current row's free space goes there; one
that does not but would fit an empty row closes the current row (the rest is padding) and starts
the next; one longer than a row is cut into pieces, the first filling the current row's free space.
Each piece is its own segment: segment ids count 1, 2, 3... within a row (0 = padding) and
positions restart at 0 for each piece, so positions stay below the row length.

The iterator state is the parent's state from just before the document that is partly placed,
plus how many of its tokens are already emitted, so a restored iterator re-reads that document and
continues from the same token.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
    """Packs 1-D int token arrays into rows `{"tokens", "segment_ids", "positions"}`, each
    int32 [row_len]."""

    def __init__(self, parent: grain.IterDataset, *, row_len: int, pad_id: int):
        super().__init__(parent)
        if row_len < 1:
            raise ValueError(f"row_len must be >= 1, got {row_len}")
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
        tokens = np.full(n_row, self._pad_id, np.int32)
        segment_ids = np.zeros(n_row, np.int32)
        positions = np.zeros(n_row, np.int32)
        used = segment = 0
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
            segment += 1
            tokens[used : used + n] = self._doc[self._offset : self._offset + n]
            segment_ids[used : used + n] = segment
            positions[used : used + n] = np.arange(n)
            used += n
            self._offset += n
            if self._offset == len(self._doc):
                self._doc = None
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["offset"]:
            if not self._load_doc():
                raise ValueError("packing state points past the end of its data")
            self._offset = int(state["offset"])
