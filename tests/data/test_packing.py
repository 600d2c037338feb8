import json

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.data import FirstFitPackIterDataset, PackIterDataset, packing_efficiency
from tessera.data.packing import first_fit_decreasing

ROW = 16


def make_docs(n=60, seed=0):
    """Documents of 1..40 tokens (some longer than a row) with ids > 0 (0 is padding)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 100, size=rng.integers(1, 41)).astype(np.int32) for _ in range(n)]


def packed(docs, row_len=ROW):
    parent = grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return PackIterDataset(parent, row_len=row_len, pad_id=0)


def check_row(row):
    """Shapes, dtypes, padding at the end only, segment ids 1, 2, 3... and positions restarting
    per segment; returns the number of used slots."""
    tok, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
    assert tok.shape == seg.shape == pos.shape == (ROW,)
    assert tok.dtype == seg.dtype == pos.dtype == np.int32
    n_used = int((seg > 0).sum())
    assert n_used > 0
    assert (seg[n_used:] == 0).all() and (tok[n_used:] == 0).all()  # padding only at the end
    assert seg[0] == 1 and set(np.diff(seg[:n_used])) <= {0, 1}  # 1, 2, 3... contiguous
    for s in range(1, seg.max() + 1):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    return n_used


def test_rows_are_consistent_and_lose_nothing():
    docs = make_docs()
    rows = list(packed(docs))
    stream = []
    for row in rows:
        n_used = check_row(row)
        stream.append(row["tokens"][:n_used])
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


# ---- first-fit packing ----


def docs_of(lengths):
    """Documents of the given lengths whose tokens are all distinct (> 0), so each can be traced."""
    start = np.cumsum([1, *lengths])
    return [np.arange(start[i], start[i + 1], dtype=np.int32) for i in range(len(lengths))]


def first_fit(docs, row_len=ROW, window=8):
    parent = grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return FirstFitPackIterDataset(parent, row_len=row_len, pad_id=0, window=window)


def pieces_of(row):
    seg = row["segment_ids"]
    return [row["tokens"][seg == s] for s in range(1, seg.max() + 1)]


def assert_same_rows(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for key in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(g[key], w[key])


def test_first_fit_decreasing_bins():
    # longest first, ties in reading order; each into the first bin with room
    assert first_fit_decreasing([5, 5, 7, 3, 10, 2], 10) == [[4], [2, 3], [0, 1], [5]]
    assert first_fit_decreasing([], 10) == []
    with pytest.raises(ValueError, match="lengths must be in"):
        first_fit_decreasing([11], 10)


def test_first_fit_rows():
    docs = [np.full(n, i + 1, np.int32) for i, n in enumerate([5, 5, 7, 3, 20, 2])]
    rows = [r["tokens"].tolist() for r in first_fit(docs, row_len=10, window=6)]
    # pieces: 5, 5, 7, 3, 10, 10, 2 -> sorted 10, 10, 7, 5, 5, 3, 2
    assert rows == [
        [5] * 10,
        [5] * 10,
        [3] * 7 + [4] * 3,
        [1] * 5 + [2] * 5,
        [6] * 2 + [0] * 8,
    ]
    # window of 2 rows (20 tokens): [5, 5, 7, 3] -> 7+3, 5+5; then [20, 2] -> 10, 10, 2
    rows = [r["tokens"].tolist() for r in first_fit(docs, row_len=10, window=2)]
    assert rows == [
        [3] * 7 + [4] * 3,
        [1] * 5 + [2] * 5,
        [5] * 10,
        [5] * 10,
        [6] * 2 + [0] * 8,
    ]


def window_of_each(lengths, window, row_len=ROW):
    """The window each document falls in: documents are read until they hold `window` rows'
    worth of tokens."""
    ids, w, tokens = [], 0, 0
    for n in lengths:
        ids.append(w)
        tokens += n
        if tokens >= window * row_len:
            w, tokens = w + 1, 0
    return ids


@pytest.mark.parametrize("window", [1, 5, 64])
def test_first_fit_rows_are_consistent_and_lose_nothing(window):
    rng = np.random.default_rng(window)
    lengths = [*rng.integers(0, 41, size=60)]  # some empty, some longer than a row
    docs = docs_of(lengths)
    rows = list(first_fit(docs, window=window))
    seen = []
    for row in rows:
        check_row(row)
        for piece in pieces_of(row):
            np.testing.assert_array_equal(np.diff(piece), 1)  # in document order
            seen.extend(piece.tolist())
    # every token of every document exactly once
    assert sorted(seen) == np.concatenate(docs).tolist()


def test_first_fit_keeps_documents_in_their_window():
    lengths = [9, 3, 12, 1, 16, 4, 7, 7, 2, 30, 5]
    docs = docs_of(lengths)
    window = 2
    windows = window_of_each(lengths, window)
    assert windows[-1] >= 2  # several windows
    doc_of = {int(t): i for i, d in enumerate(docs) for t in d}
    row_windows = [
        {windows[doc_of[int(t)]] for t in r["tokens"][r["segment_ids"] > 0]}
        for r in first_fit(docs, window=window)
    ]
    assert all(len(w) == 1 for w in row_windows)  # a row never mixes windows
    order = [w.pop() for w in row_windows]
    assert order == sorted(order) and order[-1] == windows[-1]


def test_first_fit_windows_of_empty_documents_do_not_end_the_data():
    docs = docs_of([3, 0, 0, 0, 0, 5, 0])
    for window in (1, 2, 4):
        rows = list(first_fit(docs, window=window))
        tokens = sorted(int(t) for r in rows for t in r["tokens"][r["segment_ids"] > 0])
        assert tokens == np.concatenate(docs).tolist(), window


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.one_of(st.just(0), st.integers(1, 2 * ROW + 3)), max_size=40),
    window=st.integers(1, 9),
    data=st.data(),
)
def test_first_fit_resume_property(lengths, window, data):
    docs = docs_of(lengths)
    expected = list(first_fit(docs, window=window))
    tokens = [int(t) for r in expected for t in r["tokens"][r["segment_ids"] > 0]]
    assert sorted(tokens) == list(range(1, sum(lengths) + 1))  # nothing lost or repeated
    ks = data.draw(st.lists(st.integers(0, len(expected)), min_size=1, max_size=4))
    for k in ks:
        it = iter(first_fit(docs, window=window))
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        fresh = iter(first_fit(docs, window=window))
        fresh.set_state(state)
        assert_same_rows(list(fresh), expected[k:])


def test_first_fit_resume_from_every_row_and_window_boundary():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 2 * ROW, size=30).tolist()
    docs = docs_of(lengths)
    window = 4
    expected = list(first_fit(docs, window=window))
    it = iter(first_fit(docs, window=window))
    boundaries = mid_window = 0
    for k in range(len(expected) + 1):
        state = json.loads(json.dumps(it.get_state()))
        boundaries += state["rows_emitted"] == 0
        mid_window += state["rows_emitted"] > 0
        fresh = iter(first_fit(docs, window=window))
        fresh.set_state(state)
        assert_same_rows(list(fresh), expected[k:])
        if k < len(expected):
            next(it)
    assert boundaries == len(set(window_of_each(lengths, window))) + 1  # each window + the end
    assert mid_window > 0


def test_first_fit_refuses_foreign_states():
    docs = make_docs(n=20)
    greedy = iter(packed(docs))
    next(greedy)
    ff = iter(first_fit(docs))
    with pytest.raises(ValueError, match="not a first-fit packing state"):
        ff.set_state(greedy.get_state())
    with pytest.raises(ValueError, match="not a first-fit packing state"):
        ff.set_state({"garbage": 1})
    with pytest.raises(ValueError, match="not a first-fit packing state"):
        ff.set_state([1, 2])
    other = iter(first_fit(docs, window=3))
    next(other)
    with pytest.raises(ValueError, match="window=3, row_len=16; this packer has window=8"):
        ff.set_state(other.get_state())
    next(ff)
    with pytest.raises(ValueError, match="not a greedy packing state"):
        iter(packed(docs)).set_state(ff.get_state())


def test_first_fit_state_past_its_window_is_refused():
    docs = make_docs(n=20)
    it = iter(first_fit(docs))
    next(it)
    state = it.get_state()
    state["rows_emitted"] = 1000
    with pytest.raises(ValueError, match="skips 1000 rows"):
        iter(first_fit(docs)).set_state(state)


def test_first_fit_bad_arguments():
    with pytest.raises(ValueError, match="window must be >= 1"):
        first_fit(make_docs(), window=0)
    with pytest.raises(ValueError, match="row_len must be >= 1"):
        first_fit(make_docs(), row_len=0)


def test_packing_efficiency():
    assert packing_efficiency(np.array([[1, 1, 2, 0], [1, 0, 0, 0]])) == 4 / 8
    assert packing_efficiency(np.array([3, 3])) == 1.0
    with pytest.raises(ValueError, match="empty"):
        packing_efficiency(np.zeros((0, 4)))


def test_first_fit_packs_tighter_than_greedy():
    row_len = 64
    rng = np.random.default_rng(0)
    docs = [d.astype(np.int32) for d in docs_of(rng.integers(1, row_len + 1, size=400).tolist())]

    def efficiency(rows):
        return packing_efficiency(np.stack([r["segment_ids"] for r in rows]))

    greedy = efficiency(list(packed(docs, row_len)))
    ff = efficiency(list(first_fit(docs, row_len=row_len, window=64)))
    assert greedy < 0.85
    assert ff > greedy + 0.1, (ff, greedy)
