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


TEXT_SOURCES = ("synthetic", "text", "mixture")
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


class Strided:
    """Every `step`-th document of `source` from `start`: `source[start::step]`, random access."""

    def __init__(self, source: Source, start: int, step: int):
        self._source, self._start, self._step = source, start, step
        self._len = max(0, -(-(len(source) - start) // step))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> str:
        index = operator.index(index)
        if not 0 <= index < self._len:
            raise IndexError(index)
        return self._source[self._start + index * self._step]


def stream_source(data_cfg: Any, split: str, stream: int, num_streams: int) -> Source:
    """The documents of stream `stream` of `num_streams` of `split`: `source[stream::num_streams]`
    of `make_source`. A stream left without documents is an error."""
    source = make_source(data_cfg, split)
    docs = Strided(source, stream, num_streams)
    if not len(docs):
        raise ValueError(
            f"the {split} split of data.source={data_cfg.get('source', 'synthetic')!r} has "
            f"{len(source)} documents, fewer than the {num_streams} data streams (data.streams, "
            "default: one per row of the global batch)"
        )
    return docs


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
