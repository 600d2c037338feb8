"""Random-access text sources: `len(source)` documents, `source[i] -> str`."""

from __future__ import annotations

import json
import operator
import os
from typing import Any, Protocol

from tessera.data.synthetic import SyntheticSource


class Source(Protocol):
    """A finite, random-access sequence of documents."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


class TextFileSource:
    """Documents from a file: one per non-blank line of a text file, or the `text_field` string of
    each line of a `.jsonl` file. The file is read fully on construction, so errors surface early.
    """

    def __init__(self, path: str | os.PathLike[str], text_field: str = "text"):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"data file not found: {self.path}")
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"data file {self.path} is not UTF-8 text ({e.reason})") from None
        if self.path.endswith(".jsonl"):
            docs = [
                self._jsonl_text(line, n, text_field)
                for n, line in enumerate(lines, start=1)
                if line.strip()
            ]
        else:
            docs = lines
        self._docs = [d for d in docs if d.strip()]
        if not self._docs:
            raise ValueError(f"data file {self.path} contains no documents")

    def _jsonl_text(self, line: str, lineno: int, field: str) -> str:
        where = f"{self.path}:{lineno}"
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: line is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{where}: JSON line has no field {field!r}")
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: field {field!r} is {type(record[field]).__name__}, not str")
        return record[field]

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> str:
        return self._docs[operator.index(index)]


TEXT_SOURCES = ("synthetic", "text", "mixture")
IMAGE_SOURCES = ("shapes", "image_folder", "npz", "array_record")  # data/images.py


def make_source(data_cfg: Any, split: str) -> Source:
    """Builds the source named by `data_cfg.source` for `split` ("train" or "eval").

    synthetic: `SyntheticSource(data_cfg.seed, split, data_cfg.synthetic_tasks)`.
    text: `TextFileSource(data_cfg.path)`; eval reads `data_cfg.eval_path` when set.
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
        return TextFileSource(path, text_field=data_cfg.get("text_field", "text"))
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
