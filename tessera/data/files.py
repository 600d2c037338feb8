"""Random-access documents in files: text, jsonl, parquet and array_record, read per document.

A *reader* is one file's documents: `len(reader)` and `reader[i] -> str`. Construction only checks
that the file exists; the file is opened and indexed on first use, so constructing readers for
many files is cheap. `FileDocuments` concatenates readers (and indexes all of them at once, so
that a missing, empty or unreadable file fails before training); `documents_for_stream` is the
part of a file list that one input stream reads, opening only the files of that stream when
there are at least as many files as streams.

Formats (`fmt`; "" picks one from the file name):

    text          one document per line that has a non-whitespace byte (lines end at "\\n", a
                  trailing "\\r" is dropped; whitespace means ASCII whitespace). Lines are found
                  with numpy over a memory map of the file, which is also checked to be UTF-8
                  while indexing. Any name not listed below.
    jsonl         as text, each line a JSON object whose `text_field` is the document (a string).
                  JSON is parsed when the document is read. `.jsonl`, `.json`.
    parquet       the string column `text_field`, one document per row; rows are read a row
                  group at a time (the last row group read is kept). `.parquet`.
    array_record  one document per record: a record whose first byte is "{" is a JSON object
                  whose `text_field` is the document, any other record is the UTF-8 text itself
                  (`write_text_array_record` writes documents that start with "{" as JSON, so
                  every string round-trips). `.array_record`, `.arrayrecord`, and sharded names
                  such as `train.array_record-00000-of-00008`.

At most `_MAX_OPEN` (128) readers keep their file open (one descriptor each) at a time; opening
another closes the one opened longest ago, which reopens when read again.

Compressed files (`.gz`, `.bz2`, `.xz`, `.zst`) are refused; decompress them first. Documents of
parquet and array_record files and the text fields of jsonl lines are returned as stored, blank
ones included (only blank *lines* are skipped).

Errors are one line: FileNotFoundError naming a missing file or a pattern that matches nothing;
ValueError naming the file (and line, row or record) for a file without documents, bad UTF-8, a
bad JSON line, a missing or non-string column, or an unreadable file.
"""

from __future__ import annotations

import bisect
import codecs
import collections
import contextlib
import dataclasses
import glob
import json
import operator
import os
import re
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tessera.data.sources import Source

FORMATS = ("text", "jsonl", "parquet", "array_record")

_CHUNK = 1 << 22  # bytes scanned per numpy step while indexing a text file
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_ARRAY_RECORD_NAME = re.compile(r"\.(array_record|arrayrecord)(-\d+-of-\d+)?$")


def expand_paths(pattern: str) -> list[str]:
    """The files named by `pattern`: a comma-separated list of paths and glob patterns (`*`, `?`,
    `[...]`, and `**` for any depth of directories), sorted and without duplicates (paths are
    normalized with `os.path.normpath`). Directories are not data files: a path naming one, or a
    pattern matching only directories, is an error (name the files with a glob such as
    `dir/*.parquet`). Paths cannot contain commas; a part that names an existing file is that
    file even if it has glob characters; `:` is an ordinary character (no URLs).

    Raises FileNotFoundError naming a path that does not exist or a pattern that matches no
    file, and ValueError for an empty pattern or a directory.
    """
    parts = [p.strip() for p in pattern.split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"no data files named in {pattern!r}")
    files: set[str] = set()
    for part in parts:
        if os.path.isfile(part):  # also a file whose name has glob characters, like "a[1].txt"
            files.add(os.path.normpath(part))
        elif glob.has_magic(part):
            matches = [m for m in glob.glob(part, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"no data files match {part}")
            files.update(os.path.normpath(m) for m in matches)
        elif os.path.isdir(part):
            raise ValueError(f"data path {part} is a directory; name its files, e.g. {part}/*")
        else:
            raise FileNotFoundError(f"data file not found: {part}")
    return sorted(files)


def file_format(path: str, fmt: str = "") -> str:
    """The format (one of FORMATS) of `path`: `fmt` when given, else from the file name (module
    docstring). Compressed files are a ValueError."""
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
        return fmt
    name = os.path.basename(path).lower()
    if name.endswith(_COMPRESSED):
        raise ValueError(f"compressed data files are not supported; decompress {path} first")
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if _ARRAY_RECORD_NAME.search(name):
        return "array_record"
    return "text"


# Readers with an open file (a memory map, parquet file or array_record reader: one descriptor
# each), oldest first; opening one more than _MAX_OPEN closes the oldest, which reopens on its next
# read. This bounds the descriptors (and cached row groups) of a stream that reads many files.
_MAX_OPEN = 128
_open: collections.OrderedDict[int, _FileReader] = collections.OrderedDict()
_open_lock = threading.Lock()


class _FileReader:
    """One file's documents, indexed on first use (`_load`). Pickling keeps the index but not the
    open file, which is reopened on first use after unpickling."""

    _HANDLES: tuple[str, ...] = ()  # open files and caches: dropped when closed or pickled

    def __init__(self, path: str | os.PathLike[str], text_field: str = "text"):
        self.path = os.fspath(path)
        self.text_field = text_field
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"data file not found: {self.path}")
        self._count: int | None = None

    def _load(self) -> int:
        """Opens and indexes the file; returns the number of documents (at least 1)."""
        raise NotImplementedError

    def _read(self, index: int) -> str:
        raise NotImplementedError

    def _opened(self) -> None:
        """Counts this reader among the readers with an open file (closing the oldest)."""
        with _open_lock:
            _open[id(self)] = self
            while len(_open) > _MAX_OPEN:
                _open.popitem(last=False)[1]._close()

    def _close(self) -> None:
        """Drops the open file and caches; readers in progress keep their own references."""
        for name in self._HANDLES:
            setattr(self, name, None)

    def _no_documents(self) -> ValueError:
        return ValueError(f"data file {self.path} contains no documents")

    def __len__(self) -> int:
        if self._count is None:
            self._count = self._load()
        return self._count

    def __getitem__(self, index: int) -> str:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {index} out of range for {n} documents of {self.path}")
        return self._read(i)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self._HANDLES:
            state[name] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


class TextFileReader(_FileReader):
    """Documents of a text file: its lines that have a non-whitespace byte (module docstring)."""

    _HANDLES = ("_map",)

    def __init__(self, path: str | os.PathLike[str], text_field: str = "text"):
        super().__init__(path, text_field)
        self._map: np.ndarray | None = None
        self._starts = self._ends = np.zeros(0, dtype=np.int64)

    def _bytes(self) -> np.ndarray:
        data = self._map
        if data is None:
            data = self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            self._opened()
        return data

    def _load(self) -> int:
        size = os.path.getsize(self.path)
        if size == 0:
            raise self._no_documents()
        data = self._bytes()
        decoder = codecs.getincrementaldecoder("utf-8")()
        newlines, content = [], []  # offsets of "\n"; whether the line ending there has content
        carry = False  # whether the line that runs into the next chunk has content so far
        for a in range(0, size, _CHUNK):
            chunk = data[a : a + _CHUNK]
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk.tobytes(), final=a + _CHUNK >= size)
            except UnicodeDecodeError as e:
                line = self._line_number(a - pending + e.start)
                raise ValueError(f"{self.path}:{line}: not UTF-8 text ({e.reason})") from None
            # not whitespace: 9-13 and 28-32 are the ASCII bytes that str.isspace() accepts
            solid = (chunk > 32) | ((chunk < 28) & ((chunk < 9) | (chunk > 13)))
            at = np.flatnonzero(chunk == 10)
            if not len(at):
                carry = carry or bool(solid.any())
                continue
            pieces = np.concatenate([[0], at + 1])  # each piece ends with its "\n" but the last
            tail = pieces[-1] < len(chunk)
            found = np.logical_or.reduceat(solid, pieces if tail else pieces[:-1])
            lines = found[: len(at)].copy()
            lines[0] |= carry
            carry = bool(found[-1]) if tail else False
            newlines.append(at + a)
            content.append(lines)
        breaks = np.concatenate([np.zeros(0, np.int64), *newlines])
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks, [size]])
        keep = np.concatenate([*content, [carry]])
        starts, ends = starts[keep], ends[keep]
        if not len(starts):
            raise self._no_documents()
        ends -= data[ends - 1] == 13  # a line ending "\r\n" is the text before "\r"
        self._starts, self._ends = starts, ends
        return len(starts)

    def _line_number(self, offset: int) -> int:
        """The 1-based line of byte `offset`."""
        data = self._bytes()
        return 1 + sum(
            int(np.count_nonzero(data[a : min(a + _CHUNK, offset)] == 10))
            for a in range(0, offset, _CHUNK)
        )

    def _line(self, index: int) -> tuple[str, int]:
        """Document `index`'s line and its byte offset."""
        start = int(self._starts[index])
        raw = self._bytes()[start : int(self._ends[index])].tobytes()
        return raw.decode("utf-8"), start

    def _read(self, index: int) -> str:
        return self._line(index)[0]


class JsonlFileReader(TextFileReader):
    """Documents of a JSON-lines file: the string `text_field` of each non-blank line, parsed when
    read; a bad line is a ValueError "path:line: ..."."""

    def _read(self, index: int) -> str:
        line, start = self._line(index)
        try:
            return _json_text(line, self.text_field, "JSON line")
        except ValueError as e:
            raise ValueError(f"{self.path}:{self._line_number(start)}: {e}") from None


def _json_text(text: str, field: str, what: str) -> str:
    """The string `field` of the JSON object `text` ("line is not valid JSON (...)", "JSON line
    has no field 'text'", "field 'text' is int, not str" otherwise)."""
    try:
        record: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what.split()[-1]} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{what} has no field {field!r}")
    if not isinstance(record[field], str):
        raise ValueError(f"field {field!r} is {type(record[field]).__name__}, not str")
    return record[field]


class ParquetFileReader(_FileReader):
    """Documents of a parquet file: the string column `text_field`, one per row. The row count
    comes from the file's metadata; rows are read one row group at a time, keeping the last."""

    _HANDLES = ("_file", "_cached")

    def __init__(self, path: str | os.PathLike[str], text_field: str = "text"):
        super().__init__(path, text_field)
        self._file: Any = None
        self._starts: list[int] = []
        self._cached: tuple[int, list[Any]] | None = None  # (row group, its texts), set at once

    def _parquet(self) -> Any:
        file = self._file
        if file is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                file = self._file = pq.ParquetFile(self.path)
                self._opened()
            except (pa.ArrowException, OSError) as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"{self.path} is not a readable parquet file ({msg})") from None
        return file

    def _load(self) -> int:
        import pyarrow as pa

        file = self._parquet()
        schema = file.schema_arrow
        if self.text_field not in schema.names:
            raise ValueError(
                f"{self.path} has no column {self.text_field!r}; "
                f"columns: {', '.join(schema.names) or '(none)'}"
            )
        kind = schema.field(self.text_field).type
        string_view = getattr(pa.types, "is_string_view", lambda _: False)
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or string_view(kind)):
            raise ValueError(f"{self.path}: column {self.text_field!r} is {kind}, not string")
        rows = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
        self._starts = [0, *np.cumsum(rows).tolist()]
        if not self._starts[-1]:
            raise self._no_documents()
        return self._starts[-1]

    def _read(self, index: int) -> str:
        group = bisect.bisect_right(self._starts, index) - 1
        cached = self._cached
        if cached is None or cached[0] != group:
            table = self._parquet().read_row_group(group, columns=[self.text_field])
            cached = self._cached = (group, table.column(0).to_pylist())
        text = cached[1][index - self._starts[group]]
        if text is None:
            raise ValueError(f"{self.path} row {index}: column {self.text_field!r} is null")
        return text


class ArrayRecordFileReader(_FileReader):
    """Documents of an array_record file, one per record: UTF-8 text, or a JSON object with
    `text_field` when the record starts with "{" (module docstring). Read with array_record's
    `ArrayRecordDataSource`."""

    _HANDLES = ("_source",)

    def __init__(self, path: str | os.PathLike[str], text_field: str = "text"):
        super().__init__(path, text_field)
        self._source: Any = None

    def _records(self) -> Any:
        source = self._source
        if source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            try:  # a file instruction: the data source would read "name[a:b]" as a slice
                count = _array_record_count(self.path)
                whole = _WholeFile(self.path, 0, count, count)
                source = self._source = ArrayRecordDataSource([whole])
                self._opened()
            except RuntimeError as e:
                raise ValueError(f"{self.path} is not a readable array_record file ({e})") from None
        return source

    def _load(self) -> int:
        count = len(self._records())
        if not count:
            raise self._no_documents()
        return count

    def _read(self, index: int) -> str:
        where = f"{self.path} record {index}"
        try:
            data = self._records()[index]
        except RuntimeError as e:
            raise ValueError(f"cannot read {where} ({e})") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text ({e.reason})") from None
        if not text.startswith("{"):
            return text
        try:
            return _json_text(text, self.text_field, "JSON record")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _WholeFile:
    """All records of a file, as array_record's `FileInstruction` protocol describes them."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


def _array_record_count(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return int(reader.num_records())
    finally:
        reader.close()


_READERS: dict[str, type[_FileReader]] = {
    "text": TextFileReader,
    "jsonl": JsonlFileReader,
    "parquet": ParquetFileReader,
    "array_record": ArrayRecordFileReader,
}


def open_reader(path: str | os.PathLike[str], text_field: str = "text", fmt: str = "") -> Any:
    """The reader of one file in format `fmt` ("" = from the name; `file_format`). Cheap: the
    file is opened and indexed on first `len` or read."""
    path = os.fspath(path)
    return _READERS[file_format(path, fmt)](path, text_field)


class FileDocuments:
    """The documents of `paths`, file after file: `len` is their total and `self[i]` finds the
    file by bisection over the cumulative counts. Every file is opened and indexed on
    construction, so a missing, empty or unreadable file fails here. `files` is the paths."""

    def __init__(
        self, paths: Sequence[str | os.PathLike[str]], text_field: str = "text", fmt: str = ""
    ):
        self.files = [os.fspath(p) for p in paths]
        if not self.files:
            raise ValueError("FileDocuments needs at least one file")
        self.text_field, self.format = text_field, fmt
        self.readers = [open_reader(p, text_field, fmt) for p in self.files]
        counts = [len(r) for r in self.readers]
        self._ends = np.cumsum(counts).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, document number within that file) of document `index`."""
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {index} out of range for {n} documents")
        f = bisect.bisect_right(self._ends, i)
        return f, i - (self._ends[f - 1] if f else 0)

    def __getitem__(self, index: int) -> str:
        f, i = self.locate(index)
        return self.readers[f]._read(i)

    def __repr__(self) -> str:
        return f"FileDocuments({len(self.files)} files, {len(self)} documents)"


class StridedDocuments:
    """Every `step`-th document of `docs` from `start`: `self[i] = docs[start + i * step]`."""

    def __init__(self, docs: Any, start: int, step: int):
        if step < 1 or not 0 <= start < step:
            raise ValueError(f"need 0 <= start < step, got start={start} step={step}")
        self.docs, self.start, self.step = docs, start, step
        self._len = len(range(start, len(docs), step))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> str:
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"document {index} out of range for {self._len} documents")
        return self.docs[self.start + i * self.step]

    def __repr__(self) -> str:
        return f"StridedDocuments({self.docs!r}, start={self.start}, step={self.step})"


def documents_for_streams(
    paths: Sequence[str | os.PathLike[str]],
    streams: Sequence[int],
    num_streams: int,
    text_field: str = "text",
    fmt: str = "",
) -> list[Source]:
    """The documents that each stream of `streams` (of `num_streams`) reads from `paths` (e.g.
    from `expand_paths`). With at least as many files as streams, a stream reads whole files:
    `paths[stream::num_streams]`, and no other file is opened. With fewer files, all files are
    opened once and each stream reads every `num_streams`-th document from document `stream`.
    Either way the streams' documents are disjoint and together are every document once.

    Raises ValueError when the data has fewer documents than streams (a stream would be empty).
    """
    if num_streams < 1 or any(not 0 <= s < num_streams for s in streams):
        raise ValueError(f"streams {list(streams)} out of range for {num_streams} streams")
    if not paths:
        raise ValueError("no data files")
    if len(paths) >= num_streams:
        return [FileDocuments(paths[s::num_streams], text_field, fmt) for s in streams]
    docs = FileDocuments(paths, text_field, fmt)
    if len(docs) < num_streams:
        raise ValueError(
            f"the data has {len(docs)} documents in {len(paths)} files, fewer than the "
            f"{num_streams} input streams (data.streams, default: one per row of the batch)"
        )
    return [StridedDocuments(docs, s, num_streams) for s in streams]


def documents_for_stream(
    paths: Sequence[str | os.PathLike[str]],
    stream: int,
    num_streams: int,
    text_field: str = "text",
    fmt: str = "",
) -> Source:
    """`documents_for_streams` of one stream."""
    return documents_for_streams(paths, [stream], num_streams, text_field, fmt)[0]


def write_text_array_record(
    path: str | os.PathLike[str], docs: Sequence[str], text_field: str = "text"
) -> None:
    """Writes `docs` as an array_record file of one document per record (group size 1, for
    random access): UTF-8 text, or `{text_field: doc}` as JSON for a document starting with "{"
    (module docstring). An existing file is an error; the file appears only once complete."""
    with array_record_writer(path) as writer:
        for n, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise TypeError(f"document {n} is {type(doc).__name__}, not str")
            record = json.dumps({text_field: doc}) if doc.startswith("{") else doc
            writer.write(record.encode("utf-8"))


@contextlib.contextmanager
def array_record_writer(path: str | os.PathLike[str]) -> Iterator[Any]:
    """An `ArrayRecordWriter` (group size 1, for random access) of a new file `path`, written
    under `path.tmp` and renamed into place when the block ends without an error (removed when
    it raises). An existing `path` is a FileExistsError."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"array_record file exists: {path}")
    tmp = f"{path}.tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    if not writer.ok():
        raise OSError(f"cannot create array_record file {tmp}")
    try:
        with contextlib.closing(writer):
            yield writer
    except BaseException:
        os.remove(tmp)
        raise
    os.replace(tmp, path)
