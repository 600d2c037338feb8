"""Data: sources -> tokenize -> pack (LM) or label (classify), or images -> resize/augment -> batch
-> shard per process, with resumable iterators."""

from tessera.data.classify import make_rule_pipeline
from tessera.data.files import (
    FileDocuments,
    documents_for_stream,
    expand_paths,
    write_text_array_record,
)
from tessera.data.image_pipeline import load_image, make_image_pipeline
from tessera.data.images import (
    ArrayRecordSource,
    ImageFolderSource,
    NpzSource,
    image_classes,
    write_array_record,
)
from tessera.data.packing import FirstFitPackIterDataset, PackIterDataset, packing_efficiency
from tessera.data.pipeline import Batch, DataIterator, check_ids, make_pipeline
from tessera.data.shapes import SHAPE_CLASSES, ShapesSource
from tessera.data.sources import IMAGE_SOURCES, Source, TextFileSource, make_source
from tessera.data.synthetic import (
    SyntheticSource,
    check,
    is_eval_prompt,
    parse_tasks,
    split_prompt,
    strip_rule,
    unigram_entropy,
)
from tessera.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    get_tokenizer,
)

__all__ = [
    "IMAGE_SOURCES",
    "SHAPE_CLASSES",
    "ArrayRecordSource",
    "Batch",
    "ByteTokenizer",
    "DataIterator",
    "FirstFitPackIterDataset",
    "FileDocuments",
    "HFTokenizer",
    "ImageFolderSource",
    "NpzSource",
    "PackIterDataset",
    "SentencePieceTokenizer",
    "ShapesSource",
    "Source",
    "SyntheticSource",
    "TextFileSource",
    "Tokenizer",
    "check",
    "check_ids",
    "check_vocab",
    "documents_for_stream",
    "expand_paths",
    "get_tokenizer",
    "image_classes",
    "is_eval_prompt",
    "load_image",
    "make_image_pipeline",
    "make_pipeline",
    "make_rule_pipeline",
    "make_source",
    "packing_efficiency",
    "parse_tasks",
    "split_prompt",
    "strip_rule",
    "unigram_entropy",
    "write_array_record",
    "write_text_array_record",
]
