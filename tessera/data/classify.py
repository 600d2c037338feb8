"""Labelled rows for classification: which rule of the embedded corpus an example follows.

Batch layout (B = global_batch_size // process_count, T = seq_len), one example per row:

    inputs       int32 [B, T]  [bos] + the example without its `name:` prefix + [eos]
                               (`rev:hello=olleh` -> `hello=olleh`), cut to T, right-padded
    segment_ids  int32 [B, T]  1 on real tokens, 0 on padding
    positions    int32 [B, T]  0, 1, ... on real tokens, 0 on padding
    label        int32 [B]     index of the example's rule in `parse_tasks(data.synthetic_tasks)`;
                               -1 on the empty rows that pad an eval split's last batch

copy/rev/sort rows differ only in how the answer relates to the word, so a model must compare
them; add rows are told apart by their digits.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np

from tessera.data.pipeline import (
    Batch,
    DataIterator,
    batch_rows,
    encode_document,
    shard_documents,
)
from tessera.data.synthetic import parse_tasks, strip_rule
from tessera.data.tokenizers import Tokenizer

PAD_LABEL = -1


def rule_row(
    example: str,
    *,
    tokenizer: Tokenizer,
    rules: tuple[str, ...],
    seq_len: int,
    vocab_size: int | None = None,
) -> Batch:
    """One labelled row (see the module docstring) from a synthetic example."""
    rule, body = strip_rule(example)
    ids = encode_document(tokenizer, body, vocab_size)[:seq_len]
    n = len(ids)
    inputs = np.full(seq_len, tokenizer.pad_id, np.int32)
    inputs[:n] = ids
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[:n] = 1
    positions = np.zeros(seq_len, np.int32)
    positions[:n] = np.arange(n)
    label = np.int32(rules.index(rule))
    return {"inputs": inputs, "segment_ids": segment_ids, "positions": positions, "label": label}


def make_rule_pipeline(
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
    """This process's batches of rule-labelled rows of the embedded corpus for `split`; sharding,
    shuffling, eval padding and resumable state as for `make_pipeline`."""
    if data_cfg.get("source", "synthetic") != "synthetic":
        raise ValueError(
            f"rule classification reads the embedded corpus: data.source must be 'synthetic', "
            f"got {data_cfg.source!r}"
        )
    shard = shard_documents(
        data_cfg,
        split=split,
        global_batch_size=global_batch_size,
        seq_len=seq_len,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
    )
    rules = parse_tasks(data_cfg.get("synthetic_tasks", ""))
    row = functools.partial(
        rule_row, tokenizer=tokenizer, rules=rules, seq_len=seq_len, vocab_size=vocab_size
    )
    rows = shard.docs.map(row)
    return batch_rows(
        rows.to_iter_dataset(grain.ReadOptions(num_threads=0)),
        shard,
        {"inputs": tokenizer.pad_id, "label": PAD_LABEL},
    )
