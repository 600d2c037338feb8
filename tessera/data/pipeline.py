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
None). `shard_source` (source -> shard -> shuffle/repeat; `shard_documents` for text sources) and
`batch_rows` (batch, pad, wrap as a resumable iterator) are the stages every row layout shares
(`data/classify.py` and `data/image_pipeline.py` too).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from tessera.data.packing import PackIterDataset
from tessera.data.sources import make_source
from tessera.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]
_STATE_VERSION = 1


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


class DataIterator(grain.DatasetIterator):
    """Iterator of batches (see module docstring) with a JSON-serialisable, resumable state.

    `get_state()` returns the pipeline's settings and the grain iterator state; `set_state` refuses
    a state saved under different settings (batch, seq_len, split, seed, process layout), since
    the data position would not mean the same thing. Being a `grain.DatasetIterator`, it also
    works with grain's Orbax checkpoint handler (`grain.checkpoint.CheckpointSave`).
    """

    def __init__(self, parent: grain.DatasetIterator, settings: dict[str, Any]):
        super().__init__(parent)
        self._settings = settings

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, **self._settings, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        expected = {"version": _STATE_VERSION, **self._settings}
        diff = [
            f"{k}={state.get(k)!r} (now {v!r})" for k, v in expected.items() if state.get(k) != v
        ]
        if diff:
            raise ValueError(f"data iterator state does not match this pipeline: {', '.join(diff)}")
        self._parent.set_state(state["grain"])


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
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count {process_count}"
        )
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

    Each process reads the disjoint shard `source[process_index::process_count]` and yields
    batches of `global_batch_size // process_count` rows. Train shuffles with `seed` (reshuffled
    every epoch) and repeats forever; eval reads its shard once in order and pads the last batch
    with empty rows. `data_cfg.seed` picks the synthetic corpus, `seed` the shuffle order. With
    `vocab_size`, a token id the model cannot embed is an error.
    """
    shard = shard_documents(
        data_cfg,
        split=split,
        global_batch_size=global_batch_size,
        seq_len=seq_len,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
    )
    docs = shard.docs.map(functools.partial(encode_document, tokenizer, vocab_size=vocab_size))
    rows = PackIterDataset(
        docs.to_iter_dataset(grain.ReadOptions(num_threads=0)),
        row_len=seq_len + 1,
        pad_id=tokenizer.pad_id,
    )
    fill = {"inputs": tokenizer.pad_id, "targets": tokenizer.pad_id}
    return batch_rows(rows.map(_features), shard, fill)

