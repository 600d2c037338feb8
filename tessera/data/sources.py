"""Random-access text sources: `len(source)` documents, `source[i] -> str`."""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from typing import Any, Protocol

from tessera.data.files import (
    FileDocuments,
    StridedDocuments,
    documents_for_streams,
    expand_paths,
)
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


TEXT_SOURCES = ("synthetic", "text", "mixture")
IMAGE_SOURCES = ("shapes", "image_folder", "npz", "array_record")  # data/images.py


def text_path(data_cfg: Any, split: str) -> str:
    """`data.path` (files, globs, a comma list), or for eval `data.eval_path` when set."""
    path = data_cfg.get("path", "")
    if split == "eval":
        path = data_cfg.get("eval_path", "") or path
    if not path:
        raise ValueError("data.source='text' needs data.path")
    return path


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
        return TextFileSource(
            text_path(data_cfg, split),
            text_field=data_cfg.get("text_field", "text"),
            fmt=data_cfg.get("format", ""),
        )
    if name in IMAGE_SOURCES:
        raise ValueError(
            f"data.source={name!r} is an image source (make_image_pipeline); "
            f"text sources: {', '.join(TEXT_SOURCES)}"
        )
    raise ValueError(f"unknown data source {name!r}; known: {', '.join(TEXT_SOURCES)}")


def stream_sources(
    data_cfg: Any, split: str, streams: Sequence[int], num_streams: int
) -> list[Source]:
    """The documents of each stream of `streams` (of `num_streams`) of `split`. Text files:
    `files.documents_for_streams` (a stream reads whole files when there are enough, so a host
    opens only its streams' files); other sources: `source[stream::num_streams]` of
    `make_source`. A stream left without documents is an error."""
    if data_cfg.get("source", "synthetic") == "text":
        return documents_for_streams(
            expand_paths(text_path(data_cfg, split)),
            streams,
            num_streams,
            text_field=data_cfg.get("text_field", "text"),
            fmt=data_cfg.get("format", ""),
        )
    source = make_source(data_cfg, split)
    if len(source) < num_streams:
        raise ValueError(
            f"the {split} split of data.source={data_cfg.get('source', 'synthetic')!r} has "
            f"{len(source)} documents, fewer than the {num_streams} input streams (data.streams, "
            "default: one per row of the batch)"
        )
    return [StridedDocuments(source, s, num_streams) for s in streams]


def parse_mixture(data_cfg: Any) -> list[tuple[Any, float]]:
    """`data.mixture`, "SOURCE[:PATH]=WEIGHT;...", as (data config of one source, weight) pairs.
    Each component's config is `data_cfg` with `source` (and `path`, when given) replaced; a text
    component reads no `eval_path` (its eval split is its own file)."""
    import ml_collections

    spec = str(data_cfg.get("mixture", "")).strip()
    if not spec:
        raise ValueError(
            'data.source="mixture" needs data.mixture, e.g. "text:a.txt=3;synthetic=1"'
        )
    parts = []
    for item in filter(None, (p.strip() for p in spec.split(";"))):
        name_path, eq, weight = item.rpartition("=")
        if not eq:
            raise ValueError(f"data.mixture component {item!r} has no weight (SOURCE[:PATH]=W)")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(
                f"data.mixture component {item!r}: weight {weight!r} is not a number"
            ) from None
        if not w > 0:
            raise ValueError(f"data.mixture component {item!r}: weight must be > 0")
        name, _, path = name_path.partition(":")
        if name not in ("synthetic", "text"):
            raise ValueError(
                f"data.mixture component {item!r}: source {name!r} cannot be mixed; "
                "known: synthetic, text"
            )
        cfg = ml_collections.ConfigDict(data_cfg.to_dict())
        cfg.source = name
        if path:
            cfg.path = path
            cfg.eval_path = ""
        parts.append((cfg, w))
    return parts
