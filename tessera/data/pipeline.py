"""source -> shard per process -> shuffle/repeat -> tokenize -> pack -> batch, resumable.

Batch layout (B = global_batch_size // process_count, T = seq_len), from packed rows of T + 1
tokens:

    inputs       int32   [B, T]  row[:-1]
    targets      int32   [B, T]  row[1:]
    segment_ids  int32   [B, T]  1, 2, 3... per document piece of the inputs, 0 on padding
    positions    int32   [B, T]  position of each input within its piece, from 0
    loss_mask    float32 [B, T]  1 where input and target are in the same piece, else 0
                                 (document boundaries and padding)

Each document is `[bos] + tokenizer.encode(text) + [eos]` (no bos when `tokenizer.bos_id` is
None); `data.source="seqio"` documents are the seqio task's own ids (`data/seqio_source.py`).
`shard_source` (source -> shard -> shuffle/repeat; `shard_documents` for text sources) and
`batch_rows` (batch, pad, wrap as a resumable iterator) are the stages every row layout shares
(`data/classify.py` and `data/image_pipeline.py` too).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from tessera.data.packing import FirstFitPackIterDataset, PackIterDataset
from tessera.data.sources import make_source, parse_mixture, stream_sources
from tessera.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]
_STATE_VERSION = 2  # 2: per-stream states (1: one packer per process)


def check_ids(ids: np.ndarray, vocab_size: int) -> None:
    """Raises ValueError naming an id of `ids` outside [0, vocab_size)."""
    if not ids.size:
        return
    for bad in (int(ids.max()), int(ids.min())):
        if not 0 <= bad < vocab_size:
            raise ValueError(f"token id {bad} out of range for vocab_size {vocab_size}")


def encode_document(tokenizer: Tokenizer, text: str, vocab_size: int | None = None) -> np.ndarray:
    """`[bos] + tokenizer.encode(text) + [eos]` (no bos when `tokenizer.bos_id` is None), int32;
    with `vocab_size`, an id the model cannot embed is an error."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = np.asarray([*bos, *tokenizer.encode(text), tokenizer.eos_id], np.int32)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        check_ids(ids, vocab_size)
    return ids


def _features(row: dict[str, np.ndarray]) -> Batch:
    tokens, segs = row["tokens"], row["segment_ids"]
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": segs[:-1],
        "positions": row["positions"][:-1],
        "loss_mask": ((segs[1:] == segs[:-1]) & (segs[1:] != 0)).astype(np.float32),
    }


def _pad_batch(batch: Batch, size: int, fill: Mapping[str, int]) -> Batch:
    """Pads a short final batch with empty rows (`fill[key]`, default 0) so every batch has `size`
    rows."""
    missing = size - len(next(iter(batch.values())))
    if not missing:
        return batch
    out = {}
    for key, value in batch.items():
        pad = np.full((missing, *value.shape[1:]), fill.get(key, 0), value.dtype)
        out[key] = np.concatenate([value, pad])
    return out


_LAYOUT = ("process_index", "process_count")


class DataIterator(grain.DatasetIterator):
    """Iterator of batches (see module docstring) with a JSON-serialisable, resumable state.

    `get_state()` returns the pipeline's settings and the grain iterator state; `set_state` refuses
    a state saved under different settings (batch, seq_len, split, seed, process layout), since
    the data position would not mean the same thing. Being a `grain.DatasetIterator`, it also
    works with grain's Orbax checkpoint handler (`grain.checkpoint.CheckpointSave`).
    """

    def __init__(
        self, parent: grain.DatasetIterator, settings: dict[str, Any], padding: Batch | None = None
    ):
        super().__init__(parent)
        self._settings = settings
        self._padding = padding

    def padding(self) -> Batch | None:
        """A batch of empty rows (zero weight), which a process whose eval split has ended feeds
        while others still have batches; None when the pipeline does not provide one."""
        return None if self._padding is None else {k: v.copy() for k, v in self._padding.items()}

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, **self._settings, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state of `get_state()`. `{"saved_by_processes": [...]}` (a checkpoint of
        another number of processes) restores a stream pipeline's streams from the processes that
        ran them; a pipeline without streams notes that its input restarts."""
        if "saved_by_processes" in state:
            state = self._regroup(state["saved_by_processes"])
            if state is None:
                return
        expected = {"version": _STATE_VERSION, **self._settings}
        diff = [
            f"{k}={state.get(k)!r} (now {v!r})" for k, v in expected.items() if state.get(k) != v
        ]
        if diff:
            raise ValueError(f"data iterator state does not match this pipeline: {', '.join(diff)}")
        self._parent.set_state(state["grain"])

    def _regroup(self, saved: list[dict[str, Any]]) -> dict[str, Any] | None:
        """This process's state from the states of another number of processes: each stream's
        position from the process that ran it (same settings but the process layout)."""
        if "streams" not in self._settings:
            if self._settings["process_index"] == 0:
                print(
                    f"tessera: the checkpoint holds the data positions of {len(saved)} "
                    f"processes and this run has {self._settings['process_count']}; the model and "
                    "optimizer resume, the input restarts from its beginning",
                    file=sys.stderr, flush=True,
                )
            return None
        positions: dict[int, Any] = {}
        for old in saved:
            others = {k: v for k, v in old.items() if k not in (*_LAYOUT, "grain")}
            ours = {"version": _STATE_VERSION, **self._settings}
            ours = {k: v for k, v in ours.items() if k not in _LAYOUT}
            if others != ours:  # the settings guard names the difference
                return {**old, **{k: self._settings[k] for k in _LAYOUT}}
            per = old["streams"] // old["process_count"]
            first = old["process_index"] * per
            positions.update(enumerate(old["grain"]["streams"], start=first))
        streams = self._settings["streams"]
        per = streams // self._settings["process_count"]
        first = self._settings["process_index"] * per
        mine = [positions[s] for s in range(first, first + per)]
        return {"version": _STATE_VERSION, **self._settings, "grain": {"streams": mine}}


def _check_layout(global_batch_size: int, process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count {process_count}"
        )


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's examples of a split (a grain MapDataset of documents, images, ...), its
    batch size, and the pipeline settings that guard `DataIterator.set_state`."""

    docs: grain.MapDataset
    local_batch: int
    settings: dict[str, Any]


def shard_source(
    source: Any,
    *,
    split: str,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
    **settings: Any,
) -> Shard:
    """The disjoint shard `source[process_index::process_count]` of a random-access `source`
    (`len` and `__getitem__`, as grain reads it), shuffled with `seed` (reshuffled every epoch)
    and repeated forever for train, read once in order for eval. `settings` (seq_len, image
    size, ...) join the split, batch, seed and process layout in the iterator state's guard."""
    _check_layout(global_batch_size, process_index, process_count)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(
            f"process {process_index} of {process_count} gets no data: "
            f"the {split} source has only {len(source)} examples"
        )
    if split == "train":
        ds = ds.shuffle(seed).repeat()
    settings = {
        "split": split,
        "global_batch_size": global_batch_size,
        **settings,
        "seed": seed,
        "process_index": process_index,
        "process_count": process_count,
    }
    return Shard(ds, global_batch_size // process_count, settings)


def shard_documents(
    data_cfg: Any,
    *,
    split: str,
    global_batch_size: int,
    seq_len: int,
    process_index: int,
    process_count: int,
    seed: int,
) -> Shard:
    """`shard_source` of the text source `make_source(data_cfg, split)`."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return shard_source(
        make_source(data_cfg, split),
        split=split,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        seq_len=seq_len,
    )


def batch_rows(rows: grain.IterDataset, shard: Shard, fill: Mapping[str, int]) -> DataIterator:
    """Batches of `shard.local_batch` rows; an eval split's short last batch is padded with rows
    of `fill` (see `_pad_batch`)."""
    batches = rows.batch(shard.local_batch, drop_remainder=False)
    if shard.settings["split"] != "train":
        batches = batches.map(functools.partial(_pad_batch, size=shard.local_batch, fill=fill))
    return DataIterator(batches.__iter__(), shard.settings)


def stream_layout(
    data_cfg: Any, *, global_batch_size: int, process_index: int, process_count: int
) -> tuple[int, range]:
    """(S, this process's stream ids) for `data.streams` (0: one stream per row of the global
    batch). S must divide the global batch and be a multiple of the process count; process p
    runs the S / P streams `range(p * S / P, (p + 1) * S / P)`."""
    _check_layout(global_batch_size, process_index, process_count)
    streams = int(data_cfg.get("streams", 0) or global_batch_size)
    if streams < 1 or global_batch_size % streams or streams % process_count:
        raise ValueError(
            f"data.streams={streams} must divide global_batch_size {global_batch_size} and be a "
            f"multiple of the process count {process_count}"
        )
    per = streams // process_count
    return streams, range(process_index * per, (process_index + 1) * per)


def stream_seed(seed: int, *keys: int) -> int:
    """A shuffle seed for one stream (and mixture component) of a run's `seed`."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


class _Concat:
    """Random access over several sources one after another (a mixture's eval split)."""

    def __init__(self, sources: list[Any]):
        self._sources = sources
        self._ends = np.cumsum([len(s) for s in sources])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> Any:
        i = int(np.searchsorted(self._ends, index, side="right"))
        return self._sources[i][index - (int(self._ends[i - 1]) if i else 0)]


def stream_documents(
    data_cfg: Any, *, split: str, streams: Sequence[int], num_streams: int, seed: int
) -> list[grain.MapDataset]:
    """The documents (text) of each stream of `streams`: its share of the source
    (`stream_sources`), for train shuffled with a seed of (`seed`, stream) and repeated forever
    (reshuffled every epoch), for eval once in order. `data.source="mixture"` draws from the
    components of `data.mixture` with their weights (each shuffled and repeated on its own, so
    the proportions hold); its eval split is the components' eval splits one after another."""
    if data_cfg.get("source", "synthetic") != "mixture":
        sources = stream_sources(data_cfg, split, streams, num_streams)
        docs = [grain.MapDataset.source(src) for src in sources]
        if split != "train":
            return docs
        return [d.shuffle(stream_seed(seed, s)).repeat() for d, s in zip(docs, streams)]
    parts = [stream_sources(c, split, streams, num_streams) for c, _ in parse_mixture(data_cfg)]
    weights = [w for _, w in parse_mixture(data_cfg)]
    out = []
    for j, stream in enumerate(streams):
        if split != "train":
            out.append(grain.MapDataset.source(_Concat([part[j] for part in parts])))
            continue
        docs = [
            grain.MapDataset.source(part[j]).shuffle(stream_seed(seed, stream, i)).repeat()
            for i, part in enumerate(parts)
        ]
        out.append(grain.MapDataset.mix(docs, weights))
    return out


def stream_tokens(
    data_cfg: Any,
    encode: Any,
    *,
    split: str,
    streams: Sequence[int],
    num_streams: int,
    seed: int,
    vocab_size: int | None = None,
) -> list[grain.IterDataset]:
    """Each stream's documents as int32 token arrays: `stream_documents` through `encode`, or for
    `data.source="seqio"` the seqio task's own token ids (`data/seqio_source.py`, which imports
    TensorFlow)."""
    if data_cfg.get("source", "synthetic") == "seqio":
        from tessera.data.seqio_source import seqio_stream

        return [
            seqio_stream(
                data_cfg, split=split, stream=stream, num_streams=num_streams,
                seed=stream_seed(seed, stream), vocab_size=vocab_size,
            )
            for stream in streams
        ]
    docs = stream_documents(data_cfg, split=split, streams=streams, num_streams=num_streams,
                            seed=seed)
    return [d.map(encode).to_iter_dataset(grain.ReadOptions(num_threads=0)) for d in docs]


class StreamBatches(grain.DatasetIterator):
    """Batches of `rows_per_stream` consecutive rows from each of several row iterators, in stream
    order. An exhausted stream (eval) adds `fill` rows until every stream is exhausted. The
    state is each stream's state, in order."""

    def __init__(self, streams: list[grain.DatasetIterator], rows_per_stream: int, fill: Batch):
        super().__init__(streams)
        self._streams = streams
        self._rows = rows_per_stream
        self._fill = fill
        self._done = [False] * len(streams)

    def __next__(self) -> Batch:
        rows = []
        for i, stream in enumerate(self._streams):
            for _ in range(self._rows):
                row = None if self._done[i] else next(stream, None)
                self._done[i] = row is None
                rows.append(self._fill if row is None else row)
        if all(self._done):
            raise StopIteration
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"streams": [s.get_state() for s in self._streams]}

    def set_state(self, state: dict[str, Any]) -> None:
        states = state.get("streams")
        if not isinstance(states, list) or len(states) != len(self._streams):
            raise ValueError(
                f"data iterator state holds {len(states or [])} streams, this pipeline has "
                f"{len(self._streams)}"
            )
        for stream, s in zip(self._streams, states):
            stream.set_state(s)
        self._done = [False] * len(self._streams)


PACKINGS = ("greedy", "first_fit")


def packing_name(data_cfg: Any) -> str:
    """`data.packing` ("greedy" when unset), checked; first_fit with its window."""
    name = data_cfg.get("packing", "greedy") or "greedy"
    if name not in PACKINGS:
        raise ValueError(f"unknown data.packing {name!r}; known: {', '.join(PACKINGS)}")
    return f"first_fit:{pack_window(data_cfg)}" if name == "first_fit" else name


def pack_window(data_cfg: Any) -> int:
    window = int(data_cfg.get("pack_window", 32))
    if window < 1:
        raise ValueError(f"data.pack_window must be >= 1, got {window}")
    return window


def make_packer(data_cfg: Any, *, row_len: int, pad_id: int) -> Any:
    """`tokens -> rows`: the packer `data.packing` names (`data/packing.py`): greedy, in
    document order, or first-fit decreasing over windows of documents that fill
    `data.pack_window` rows."""
    if packing_name(data_cfg) == "greedy":
        return functools.partial(PackIterDataset, row_len=row_len, pad_id=pad_id)
    return functools.partial(
        FirstFitPackIterDataset, row_len=row_len, pad_id=pad_id, window=pack_window(data_cfg)
    )


def make_pipeline(
    data_cfg: Any,
    *,
    tokenizer: Tokenizer,
    global_batch_size: int,
    seq_len: int,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    vocab_size: int | None = None,
) -> DataIterator:
    """Builds this process's batch iterator of packed LM rows for `split`.

    The global batch is drawn from S = `data.streams` independent streams (default: one per
    row), each with its own share of the documents (`stream_documents`), tokenizer pass and
    packer; a stream gives B / S consecutive rows of each batch. Process p runs streams
    [p S / P, (p + 1) S / P), so its rows are its slice of the global batch, which is the same for
    any number of processes. Train shuffles (per stream, with `seed`) and repeats forever; eval
    reads each stream's share once in order, filling with empty rows once a stream ends.
    `data_cfg.seed` picks the synthetic corpus, `seed` the shuffle order. With `vocab_size`, a
    token id the model cannot embed is an error.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    streams, mine = stream_layout(
        data_cfg,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    encode = functools.partial(encode_document, tokenizer, vocab_size=vocab_size)
    packer = make_packer(data_cfg, row_len=seq_len + 1, pad_id=tokenizer.pad_id)
    rows = []
    for tokens in stream_tokens(
        data_cfg, encode, split=split, streams=mine, num_streams=streams, seed=seed,
        vocab_size=vocab_size,
    ):
        rows.append(packer(tokens).map(_features).__iter__())
    empty = {
        "tokens": np.full(seq_len + 1, tokenizer.pad_id, np.int32),
        "segment_ids": np.zeros(seq_len + 1, np.int32),
        "positions": np.zeros(seq_len + 1, np.int32),
    }
    settings = {
        "split": split,
        "global_batch_size": global_batch_size,
        "seq_len": seq_len,
        "seed": seed,
        "streams": streams,
        "packing": packing_name(data_cfg),
        "process_index": process_index,
        "process_count": process_count,
    }
    fill = _features(empty)
    padding = {k: np.stack([v] * (global_batch_size // process_count)) for k, v in fill.items()}
    return DataIterator(StreamBatches(rows, global_batch_size // streams, fill), settings, padding)
