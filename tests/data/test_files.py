import collections
import json
import os
import pickle
import random

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.data import files
from tessera.data.files import (
    FileDocuments,
    StridedDocuments,
    documents_for_stream,
    expand_paths,
    file_format,
    open_reader,
    write_text_array_record,
)
from tessera.data.sources import TextFileSource, make_source

# Documents that every format stores: unicode, inner whitespace, a leading "{", a JSON-looking one.
DOCS = ["first doc", "  two\tspaced  ", "été ünïcode 日本", "{not json", '{"text": "x"}', "z" * 300]


def write(path, docs, fmt, text_field="text"):
    """Writes `docs` at `path` in `fmt`; text and jsonl get blank lines and CRLF endings mixed in,
    which are not documents."""
    path = str(path)
    if fmt == "text":
        body = "".join(f"{d}\r\n" if n % 2 else f"\n  \n{d}\n" for n, d in enumerate(docs))
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(body.rstrip("\n"))
    elif fmt == "jsonl":
        lines = [json.dumps({text_field: d, "n": n}) for n, d in enumerate(docs)]
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("\n\n".join(lines) + "\r\n\n")
    elif fmt == "parquet":
        table = pa.table({"id": list(range(len(docs))), text_field: list(docs)})
        pq.write_table(table, path, row_group_size=2)
    elif fmt == "array_record":
        write_text_array_record(path, docs, text_field=text_field)
    return path


EXT = {"text": "txt", "jsonl": "jsonl", "parquet": "parquet", "array_record": "array_record"}


@pytest.mark.parametrize("fmt", files.FORMATS)
def test_reader_matches_reference(tmp_path, fmt):
    path = write(tmp_path / f"d.{EXT[fmt]}", DOCS, fmt)
    reader = open_reader(path)
    assert type(reader).__name__.lower().startswith(fmt.replace("_", ""))
    assert len(reader) == len(DOCS)
    assert [reader[i] for i in range(len(DOCS))] == DOCS
    order = list(range(len(DOCS)))
    random.Random(0).shuffle(order)
    assert [reader[i] for i in order] == [DOCS[i] for i in order]
    assert reader[-1] == DOCS[-1]
    with pytest.raises(IndexError):
        reader[len(DOCS)]
    again = pickle.loads(pickle.dumps(reader))
    assert [again[i] for i in reversed(range(len(DOCS)))] == DOCS[::-1]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "array_record"])
def test_text_field(tmp_path, fmt):
    path = write(tmp_path / f"d.{EXT[fmt]}", DOCS, fmt, text_field="body")
    reader = open_reader(path, text_field="body")
    assert [reader[i] for i in range(len(reader))] == DOCS


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_text_index_across_chunks(tmp_path, monkeypatch, chunk):
    """Lines, blank lines, CRLF and multi-byte characters that straddle the indexing chunks."""
    monkeypatch.setattr(files, "_CHUNK", chunk)
    path = tmp_path / "d.txt"
    path.write_bytes("a\n\n \t \r\nbé c\r\n\x0b\n日本語\n€\nlast no newline".encode())
    reader = open_reader(path)
    assert [reader[i] for i in range(len(reader))] == [
        "a",
        "bé c",
        "日本語",
        "€",
        "last no newline",
    ]


@pytest.mark.parametrize("chunk", [1, 2, 5, 4096])
def test_text_index_random_against_python(tmp_path, monkeypatch, chunk):
    """Random texts of letters, multi-byte characters and every kind of whitespace, against
    splitting the decoded text in Python."""
    monkeypatch.setattr(files, "_CHUNK", chunk)
    rng = random.Random(chunk)
    alphabet = ["a", "b", "é", "日", " ", "\t", "\r", "\n", "\n", "\x0b", "\x0c", "\x1f"]
    for n in range(20):
        text = "x" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        expected = [line for line in lines if line.strip(" \t\r\x0b\x0c\x1c\x1d\x1e\x1f")]
        path = tmp_path / f"r{n}.txt"
        path.write_bytes(text.encode())
        reader = open_reader(path)
        assert [reader[i] for i in range(len(reader))] == expected, repr(text)


def test_parquet_reads_row_groups_on_demand(tmp_path, monkeypatch):
    """The row count comes from the metadata; reading in order reads each row group once."""
    path = write(tmp_path / "d.parquet", DOCS, "parquet")  # row groups of 2 rows
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda self, i, **kw: reads.append(i) or original(self, i, **kw),
    )
    reader = open_reader(path)
    assert len(reader) == len(DOCS) and reads == []
    assert [reader[i] for i in range(len(DOCS))] == DOCS
    assert reads == [0, 1, 2]
    assert reader[5] == DOCS[5] and reader[0] == DOCS[0] and reads == [0, 1, 2, 0]


def test_file_format(tmp_path):
    assert file_format("a/b.jsonl") == file_format("b.JSON") == "jsonl"
    assert file_format("x.parquet") == "parquet"
    assert file_format("x.array_record") == file_format("x.arrayrecord") == "array_record"
    assert file_format("train.array_record-00003-of-00010") == "array_record"
    assert file_format("x.txt") == file_format("README") == file_format("x.tsv") == "text"
    assert file_format("x.txt", "jsonl") == "jsonl"
    with pytest.raises(ValueError, match="unknown data format 'csv'; known: text, jsonl"):
        file_format("x.txt", "csv")
    with pytest.raises(ValueError, match="compressed data files are not supported.*x.jsonl.gz"):
        file_format("x.jsonl.gz")
    # the override reads a jsonl file with another name as jsonl
    path = write(tmp_path / "d.dat", DOCS, "jsonl")
    assert open_reader(path, fmt="jsonl")[2] == DOCS[2]
    assert open_reader(path)[0].startswith('{"text"')


def test_expand_paths(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for name in ["b.txt", "a.txt", "c.jsonl", "sub/d.txt", "sub/deep/e.txt", "odd:na[1]me.txt"]:
        (tmp_path / name).write_text("x\n")
    t = str(tmp_path)
    assert expand_paths(f"{t}/*.txt") == [f"{t}/a.txt", f"{t}/b.txt", f"{t}/odd:na[1]me.txt"]
    assert expand_paths(f"{t}/**/*.txt") == sorted(
        f"{t}/{n}" for n in ["a.txt", "b.txt", "odd:na[1]me.txt", "sub/d.txt", "sub/deep/e.txt"]
    )
    # comma list: sorted, duplicates (also spelled differently) once, spaces and empty parts ignored
    got = expand_paths(f"{t}/c.jsonl, {t}/a.txt,{t}/./a.txt,{t}/?.txt,")
    assert got == [f"{t}/a.txt", f"{t}/b.txt", f"{t}/c.jsonl"]
    # a file whose name has glob characters and a colon is itself
    assert expand_paths(f"{t}/odd:na[1]me.txt") == [f"{t}/odd:na[1]me.txt"]
    # directories are skipped by globs and refused by name
    assert f"{t}/sub" not in expand_paths(f"{t}/*")
    with pytest.raises(ValueError, match="is a directory"):
        expand_paths(f"{t}/sub")


def test_expand_paths_errors(tmp_path):
    t = str(tmp_path)
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(FileNotFoundError, match=r"no data files match .*/\*\.parquet$"):
        expand_paths(f"{t}/a.txt,{t}/*.parquet")
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*/nope\.txt$"):
        expand_paths(f"{t}/nope.txt")
    with pytest.raises(ValueError, match="no data files named"):
        expand_paths(" , ")


def make_files(tmp_path, counts):
    """Files of each format in turn with `counts[k]` documents; their paths and all documents."""
    paths, docs = [], []
    for k, n in enumerate(counts):
        fmt = files.FORMATS[k % len(files.FORMATS)]
        mine = [f"file{k} doc{i}" for i in range(n)]
        paths.append(write(tmp_path / f"f{k:02d}.{EXT[fmt]}", mine, fmt))
        docs += mine
    return paths, docs


def test_file_documents(tmp_path):
    paths, docs = make_files(tmp_path, [3, 1, 4, 2, 5])
    fd = FileDocuments(paths)
    assert fd.files == paths and len(fd) == len(docs) == 15
    assert [fd[i] for i in range(len(fd))] == docs
    assert [fd[i] for i in range(14, -1, -3)] == docs[14::-3]
    assert fd[-1] == docs[-1]
    assert fd.locate(3) == (1, 0) and fd.locate(4) == (2, 0) and fd.locate(14) == (4, 4)
    with pytest.raises(IndexError):
        fd[15]
    with pytest.raises(ValueError, match="at least one file"):
        FileDocuments([])


def test_open_files_are_bounded(tmp_path, monkeypatch):
    """With more files than may be open at once, the oldest are closed and reopen on a read."""
    monkeypatch.setattr(files, "_MAX_OPEN", 2)
    monkeypatch.setattr(files, "_open", collections.OrderedDict())
    paths, docs = make_files(tmp_path, [2, 3, 1, 2, 3, 2, 1, 2])

    def open_handles():
        return sum(any(getattr(r, n) is not None for n in r._HANDLES) for r in fd.readers)

    fd = FileDocuments(paths)
    assert open_handles() <= 2 and len(files._open) == 2
    order = list(range(len(docs))) * 2
    random.Random(1).shuffle(order)
    assert [fd[i] for i in order] == [docs[i] for i in order]
    assert open_handles() <= 2 and len(files._open) == 2


def stream_docs(paths, num_streams):
    out = []
    for s in range(num_streams):
        src = documents_for_stream(paths, s, num_streams)
        out.append([src[i] for i in range(len(src))])
    return out


@pytest.mark.parametrize("num_streams", [1, 2, 3, 5])
def test_streams_read_whole_files(tmp_path, num_streams):
    """At least as many files as streams: stream s reads files s, s+S, ... and nothing else."""
    paths, docs = make_files(tmp_path, [3, 1, 4, 2, 5])
    per_stream = stream_docs(paths, num_streams)
    for s, got in enumerate(per_stream):
        src = documents_for_stream(paths, s, num_streams)
        assert isinstance(src, FileDocuments) and src.files == paths[s::num_streams]
        assert {d.split()[0] for d in got} == {f"file{k}" for k in range(s, 5, num_streams)}
    flat = [d for got in per_stream for d in got]
    assert sorted(flat) == sorted(docs) and len(set(flat)) == len(flat)


@pytest.mark.parametrize("num_streams", [3, 4, 7, 15])
def test_streams_stride_documents(tmp_path, num_streams):
    """Fewer files than streams: stream s reads documents s, s+S, ... of all files."""
    paths, docs = make_files(tmp_path, [6, 9])
    per_stream = stream_docs(paths, num_streams)
    for s, got in enumerate(per_stream):
        assert isinstance(documents_for_stream(paths, s, num_streams), StridedDocuments)
        assert got == docs[s::num_streams]
    flat = [d for got in per_stream for d in got]
    assert sorted(flat) == sorted(docs) and len(set(flat)) == len(flat)


def test_stream_opens_only_its_files(tmp_path):
    paths, _ = make_files(tmp_path, [2, 2, 2, 2])
    with open(paths[1], "w"):  # emptied: the error is stream 1's only
        pass
    assert len(documents_for_stream(paths, 0, 2)) == 4
    with pytest.raises(ValueError, match="f01.jsonl contains no documents"):
        documents_for_stream(paths, 1, 2)


def test_stream_errors(tmp_path):
    paths, _ = make_files(tmp_path, [2, 1])
    assert len(documents_for_stream(paths, 2, 3)) == 1
    with pytest.raises(ValueError, match="the data has 3 documents in 2 files, fewer than the 4"):
        documents_for_stream(paths, 0, 4)
    for stream, num in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="out of range"):
            documents_for_stream(paths, stream, num)
    with pytest.raises(ValueError, match="no data files"):
        documents_for_stream([], 0, 1)


@pytest.mark.parametrize("content", [b"", b"\n  \r\n\t\n"])
@pytest.mark.parametrize("name", ["e.txt", "e.jsonl"])
def test_empty_text_files(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    reader = open_reader(path)  # cheap: nothing read yet
    with pytest.raises(ValueError, match=f"data file {path} contains no documents"):
        len(reader)
    with pytest.raises(ValueError, match="contains no documents"):
        FileDocuments([path])


def test_empty_parquet_and_array_record(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    write_text_array_record(tmp_path / "e.array_record", [])
    for name in ["e.parquet", "e.array_record"]:
        with pytest.raises(ValueError, match=f"{name} contains no documents"):
            FileDocuments([tmp_path / name])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.parquet"):
        open_reader(tmp_path / "nope.parquet")


def test_bad_utf8_names_line(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"ok\n\nstill ok \xc3\xa9\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bin.txt:4: not UTF-8 text \(invalid start byte\)"):
        FileDocuments([path])


def test_bad_jsonl_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n{"body": "x"}\n[1, 2]\n{"text": 5}\n')
    fd = FileDocuments([path])  # JSON is parsed on access
    assert len(fd) == 5 and fd[0] == "ok"
    with pytest.raises(ValueError, match=r"bad.jsonl:3: line is not valid JSON \(Expecting value"):
        fd[1]
    for i, lineno in [(2, 4), (3, 5)]:
        with pytest.raises(ValueError, match=rf"bad.jsonl:{lineno}: JSON line has no field 'text'"):
            fd[i]
    with pytest.raises(ValueError, match=r"bad.jsonl:6: field 'text' is int, not str"):
        fd[4]


def test_bad_array_record_records(tmp_path):
    path = tmp_path / "bad.array_record"
    write_text_array_record(path, ["fine", "{also fine"], text_field="body")
    reader = open_reader(path)  # written for text_field "body", read for "text"
    assert reader[0] == "fine"
    with pytest.raises(ValueError, match=r"bad.array_record record 1: JSON record has no field"):
        reader[1]
    with pytest.raises(FileExistsError):
        write_text_array_record(path, ["again"])
    (tmp_path / "junk.array_record").write_bytes(b"not an array record")
    with pytest.raises(ValueError, match="junk.array_record is not a readable array_record file"):
        FileDocuments([tmp_path / "junk.array_record"])


def test_bad_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["a", None]}), path)
    with pytest.raises(ValueError, match=r"d.parquet has no column 'text'; columns: id, body$"):
        FileDocuments([path])
    with pytest.raises(ValueError, match=r"d.parquet: column 'id' is int64, not string"):
        FileDocuments([path], text_field="id")
    fd = FileDocuments([path], text_field="body")
    assert fd[0] == "a"
    with pytest.raises(ValueError, match=r"d.parquet row 1: column 'body' is null"):
        fd[1]
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="junk.parquet is not a readable parquet file"):
        FileDocuments([tmp_path / "junk.parquet"])


def test_text_file_source_globs_and_formats(tmp_path):
    paths, docs = make_files(tmp_path, [2, 3, 1, 2])
    t = str(tmp_path)
    src = TextFileSource(f"{t}/f*")
    assert src.files == paths and [src[i] for i in range(len(src))] == docs
    src = TextFileSource(f"{t}/f03.array_record,{t}/f01.jsonl")
    assert [src[i] for i in range(len(src))] == docs[2:5] + docs[6:]
    cfg = ml_collections.ConfigDict(dict(source="text", path=f"{t}/*.parquet"))
    assert [make_source(cfg, "train")[i] for i in range(1)] == docs[5:6]
    os.rename(paths[1], f"{t}/f01.dat")
    cfg = ml_collections.ConfigDict(dict(source="text", path=f"{t}/f01.dat", format="jsonl"))
    assert make_source(cfg, "eval")[2] == docs[4]
    with pytest.raises(FileNotFoundError, match="no data files match"):
        TextFileSource(f"{t}/*.nothing")


def test_text_file_source_validates_unless_asked_not_to(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: line is not valid JSON"):
        TextFileSource(path)
    assert TextFileSource(path, validate=False)[0] == "ok"
