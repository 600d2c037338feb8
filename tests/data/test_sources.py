import json

import ml_collections
import pytest

from tessera.data import SyntheticSource, TextFileSource, make_source


def cfg(**kw):
    return ml_collections.ConfigDict(kw)


def test_text_file_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\n\n   \nsecond  doc \r\nthird\n")
    src = TextFileSource(path)
    assert len(src) == 3
    assert [src[i] for i in range(3)] == ["first doc", "second  doc ", "third"]


def test_jsonl_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "a b", "body": "x"}, {"text": "c", "body": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [TextFileSource(path)[i] for i in range(2)] == ["a b", "c"]
    assert [TextFileSource(path, text_field="body")[i] for i in range(2)] == ["x", "y"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TextFileSource(tmp_path / "nope.txt")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"data file {path} contains no documents"):
        TextFileSource(path)


def test_bad_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: line is not valid JSON"):
        TextFileSource(path)


@pytest.mark.parametrize("line", ['{"body": "x"}', "[1, 2]", '{"text": 5}'])
def test_jsonl_line_without_text(tmp_path, line):
    path = tmp_path / "nofield.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"nofield.jsonl:2: .*field 'text'"):
        TextFileSource(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        TextFileSource(path)


def test_make_source(tmp_path):
    train, ev = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text("t1\nt2\n")
    ev.write_text("e1\n")
    src = make_source(cfg(source="text", path=str(train)), "eval")
    assert src[0] == "t1"
    src = make_source(cfg(source="text", path=str(train), eval_path=str(ev)), "eval")
    assert (len(src), src[0]) == (1, "e1")
    assert make_source(cfg(source="text", path=str(train), eval_path=str(ev)), "train")[1] == "t2"
    syn = make_source(cfg(source="synthetic", seed=4, synthetic_tasks="rev"), "eval")
    assert isinstance(syn, SyntheticSource) and syn.split == "eval" and syn.tasks == ("rev",)
    assert syn[0] == SyntheticSource(seed=4, split="eval", tasks="rev")[0]
    assert isinstance(make_source(cfg(), "train"), SyntheticSource)


def test_make_source_errors():
    with pytest.raises(ValueError, match="unknown data source 'tfds'; known: synthetic, text"):
        make_source(cfg(source="tfds"), "train")
    with pytest.raises(ValueError, match="needs data.path"):
        make_source(cfg(source="text", path=""), "train")
    with pytest.raises(ValueError, match="unknown split"):
        make_source(cfg(), "validation")
