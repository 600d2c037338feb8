"""Random-access text sources: `len(source)` documents, `source[i] -> str`."""

from __future__ import annotations

import operator
import os
from typing import Any, Protocol

from tessera.data.files import FileDocuments, expand_paths
from tessera.data.synthetic import SyntheticSource


class Source(Protocol):
    """A finite, random-access sequence of documents."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


class TextFileSource:
    """Documents of `path`: one file, a glob, or a comma-separated list of files and globs
    (`tessera.data.files.expand_paths`), file after file in sorted order, in any format of
    `tessera.data.files` (text lines, jsonl, parquet, array_record; `fmt` "" picks it from each
    file's name). Documents are read from the files on access, not kept in memory.

    Construction fails with a one-line error for a missing file, a pattern that matches nothing,
    or a file without documents; with `validate` (the default) it also reads every document once,
    so that a bad UTF-8 or JSON line fails here rather than during training.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        text_field: str = "text",
        fmt: str = "",
        validate: bool = True,
    ):
        self.path = os.fspath(path)
        self.files = expand_paths(self.path)
        self._docs = FileDocuments(self.files, text_field=text_field, fmt=fmt)
        if validate:
            for i in range(len(self._docs)):
                self._docs[i]

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> str:
        return self._docs[operator.index(index)]


TEXT_SOURCES = ("synthetic", "text")
IMAGE_SOURCES = ("shapes", "image_folder", "npz", "array_record")  # data/images.py


def make_source(data_cfg: Any, split: str) -> Source:
    """Builds the source named by `data_cfg.source` for `split` ("train" or "eval").

    synthetic: `SyntheticSource(data_cfg.seed, split, data_cfg.synthetic_tasks)`.
    text: `TextFileSource(data_cfg.path, data_cfg.text_field, data_cfg.format)`; eval reads
    `data_cfg.eval_path` when set. Paths may be globs and comma-separated lists.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; known: train, eval")
    name = data_cfg.get("source", "synthetic")
    if name == "synthetic":
        return SyntheticSource(
            seed=data_cfg.get("seed", 0), split=split, tasks=data_cfg.get("synthetic_tasks", "")
        )
    if name == "text":
        path = data_cfg.get("path", "")
        if split == "eval":
            path = data_cfg.get("eval_path", "") or path
        if not path:
            raise ValueError("data.source='text' needs data.path")
        return TextFileSource(
            path, text_field=data_cfg.get("text_field", "text"), fmt=data_cfg.get("format", "")
        )
    if name in IMAGE_SOURCES:
        raise ValueError(
            f"data.source={name!r} is an image source (make_image_pipeline); "
            f"text sources: {', '.join(TEXT_SOURCES)}"
        )
    raise ValueError(f"unknown data source {name!r}; known: {', '.join(TEXT_SOURCES)}")
