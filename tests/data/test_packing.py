import json

import grain
import numpy as np
import pytest

from tessera.data import PackIterDataset

ROW = 16


def make_docs(n=60, seed=0):
    """Documents of 1..40 tokens (some longer than a row) with ids > 0 (0 is padding)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 100, size=rng.integers(1, 41)).astype(np.int32) for _ in range(n)]


def packed(docs, row_len=ROW):
    parent = grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return PackIterDataset(parent, row_len=row_len, pad_id=0)


def test_rows_are_consistent_and_lose_nothing():
    docs = make_docs()
    rows = list(packed(docs))
    stream = []
    for row in rows:
        tok, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
        assert tok.shape == seg.shape == pos.shape == (ROW,)
        assert tok.dtype == seg.dtype == pos.dtype == np.int32
        n_used = int((seg > 0).sum())
        assert n_used > 0
        assert (seg[n_used:] == 0).all() and (tok[n_used:] == 0).all()  # padding only at the end
        assert seg[0] == 1 and set(np.diff(seg[:n_used])) <= {0, 1}  # 1, 2, 3... contiguous
        for s in range(1, seg.max() + 1):
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
        stream.append(tok[:n_used])
    np.testing.assert_array_equal(np.concatenate(stream), np.concatenate(docs))


def test_short_documents_are_never_split():
    docs = make_docs()
    pieces = [
        tuple(row["tokens"][row["segment_ids"] == s])
        for row in packed(docs)
        for s in range(1, row["segment_ids"].max() + 1)
    ]
    for doc in docs:
        if len(doc) <= ROW:
            assert tuple(doc) in pieces
    assert max(len(p) for p in pieces) == ROW


def test_greedy_fill():
    docs = [np.full(n, i + 1, np.int32) for i, n in enumerate([5, 5, 7, 3, 20])]
    rows = [r["tokens"].tolist() for r in packed(docs, row_len=10)]
    assert rows == [
        [1] * 5 + [2] * 5,
        [3] * 7 + [4] * 3,
        [5] * 10,
        [5] * 10,
    ]


@pytest.mark.parametrize("row_len", [7, ROW])
def test_resume_from_every_position(row_len):
    docs = make_docs(n=25, seed=1)
    expected = list(packed(docs, row_len))
    it = iter(packed(docs, row_len))
    saw_partial_doc = False
    for k in range(len(expected)):
        state = json.loads(json.dumps(it.get_state()))
        saw_partial_doc |= state["offset"] > 0
        fresh = iter(packed(docs, row_len))
        fresh.set_state(state)
        rest = list(fresh)
        assert len(rest) == len(expected) - k
        for got, want in zip(rest, expected[k:], strict=True):
            np.testing.assert_array_equal(got["tokens"], want["tokens"])
            np.testing.assert_array_equal(got["segment_ids"], want["segment_ids"])
        next(it)
    assert saw_partial_doc
