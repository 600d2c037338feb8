"""Data: sources -> tokenize -> pack (LM) or label (classify) -> batch -> shard per process, with
resumable iterators."""

from tessera.data.classify import make_rule_pipeline
from tessera.data.packing import PackIterDataset
from tessera.data.pipeline import Batch, DataIterator, check_ids, make_pipeline
from tessera.data.sources import Source, TextFileSource, make_source
from tessera.data.synthetic import (
    SyntheticSource,
    check,
    is_eval_prompt,
    parse_tasks,
    split_prompt,
    strip_rule,
    unigram_entropy,
)
from tessera.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "Batch",
    "ByteTokenizer",
    "DataIterator",
    "HFTokenizer",
    "PackIterDataset",
    "Source",
    "SyntheticSource",
    "TextFileSource",
    "Tokenizer",
    "check",
    "check_ids",
    "get_tokenizer",
    "is_eval_prompt",
    "make_pipeline",
    "make_rule_pipeline",
    "make_source",
    "parse_tasks",
    "split_prompt",
    "strip_rule",
    "unigram_entropy",
]
