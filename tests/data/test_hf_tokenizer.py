"""HFTokenizer: a tokenizer.json built in the test (no download), its special ids from the
config files beside it, `get_tokenizer("hf:...")` and the pipeline without a BOS token."""

import os

import ml_collections
import numpy as np
import pytest

from tessera.data import HFTokenizer, get_tokenizer, make_pipeline
from tests.data import tiny_tokenizer

TEXTS = ["hello world", "the lazy dog 417+38=455", "ünïcødé ✓ and\nnew lines  "]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    tiny_tokenizer.write(path, special_tokens_map={"pad_token": "<pad>"})
    return path


def test_round_trip_and_special_ids(tok_dir):
    tok = HFTokenizer(tok_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == tiny_tokenizer.VOCAB_SIZE
    raw = tiny_tokenizer.build()
    for text in TEXTS:
        ids = tok.encode(text)
        # The tokenizer's own post-processor would add <s>; encode adds no special tokens.
        assert raw.encode(text).ids == [1, *ids]
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert ids and not {0, 1, 2} & set(ids)
        assert all(0 <= t < tok.vocab_size for t in ids)
        assert tok.decode(ids) == text
        assert tok.decode(np.array([1, *ids, 2, 0, 0])) == text  # specials skipped
    assert len(tok.encode("hello world")) < len(b"hello world")  # merges are used


def test_special_token_fallbacks(tmp_path):
    def make(name, config, special_tokens_map=None):
        return HFTokenizer(tiny_tokenizer.write(str(tmp_path / name), config, special_tokens_map))

    eos_only = make("eos_only", {"eos_token": "</s>"})
    assert (eos_only.bos_id, eos_only.eos_id, eos_only.pad_id) == (None, 2, 2)  # pad = eos
    no_add = make("no_add", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False})
    assert no_add.bos_id is None
    null_bos = make("null_bos", {"bos_token": None, "eos_token": "</s>", "pad_token": "<pad>"})
    assert (null_bos.bos_id, null_bos.pad_id) == (None, 0)
    # special_tokens_map.json beside it fills in, and wins over, tokenizer_config.json.
    mapped = make(
        "mapped", {"eos_token": "<pad>"}, {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    )
    assert (mapped.bos_id, mapped.eos_id, mapped.pad_id) == (1, 2, 2)
    with pytest.raises(ValueError, match="no eos_token in tokenizer_config.json or special_"):
        make("no_eos", {"bos_token": "<s>"})
    with pytest.raises(ValueError, match="the bos_token '<bos>' is not in the tokenizer's vocab"):
        make("unknown", {"bos_token": "<bos>", "eos_token": "</s>"})
    (tmp_path / "bad_config").mkdir()
    (tmp_path / "bad_config" / "tokenizer_config.json").write_text("{not json")
    tiny_tokenizer.build().save(str(tmp_path / "bad_config" / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer(str(tmp_path / "bad_config"))


def test_get_tokenizer_paths_and_errors(tok_dir, tmp_path):
    file = os.path.join(tok_dir, "tokenizer.json")
    for name in (f"hf:{tok_dir}", f"hf:{file}"):
        tok = get_tokenizer(name)
        assert isinstance(tok, HFTokenizer) and tok.path == file
        assert tok.encode("hello") == HFTokenizer(tok_dir).encode("hello")
    parent, base = os.path.split(tok_dir)
    assert get_tokenizer(f"hf:{base}", base_dir=parent).path == file
    assert get_tokenizer(f"hf:{base}/tokenizer.json", base_dir=parent).path == file
    assert get_tokenizer(f"hf:{file}", base_dir=str(tmp_path)).path == file  # absolute: kept

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"tokenizer {missing} does not exist"):
        get_tokenizer(f"hf:{missing}")
    with pytest.raises(FileNotFoundError, match=f"tokenizer {missing}/tok does not exist"):
        get_tokenizer("hf:tok", base_dir=missing)
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in .*spm \(it has a "
                       r"tokenizer.model: name it spm:.*spm\)"):
        get_tokenizer(f"hf:{tmp_path / 'spm'}")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load the Hugging Face tokenizer .*broken.json"):
        get_tokenizer(f"hf:{tmp_path / 'broken.json'}")
    with pytest.raises(ValueError, match="names no path"):
        get_tokenizer("hf:")
    known = r"known: byte, hf:<path>, spm:<path>, seqio$"
    with pytest.raises(ValueError, match=r"unknown tokenizer 'spm'; " + known):
        get_tokenizer("spm")
    with pytest.raises(ValueError, match=r"names no path \(spm:DIR or spm:DIR/tokenizer.model\)"):
        get_tokenizer("spm:")


def test_pipeline_without_bos(tmp_path):
    tiny_tokenizer.write(str(tmp_path / "tok"), {"eos_token": "</s>", "pad_token": "<pad>"})
    tok = get_tokenizer("hf:tok", base_dir=str(tmp_path))
    docs = ["hello world", "the lazy dog"]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n")
    data_cfg = ml_collections.ConfigDict(
        {"source": "text", "path": str(tmp_path / "docs.txt"), "seed": 0}
    )
    batches = make_pipeline(
        data_cfg, tokenizer=tok, global_batch_size=1, seq_len=32, split="eval"
    )
    batch = next(batches)
    row = np.append(batch["inputs"][0], batch["targets"][0][-1])
    want = [*tok.encode(docs[0]), tok.eos_id, *tok.encode(docs[1]), tok.eos_id]
    assert row[: len(want)].tolist() == want  # no BOS before either document
    assert set(row[len(want) :].tolist()) == {tok.pad_id}
