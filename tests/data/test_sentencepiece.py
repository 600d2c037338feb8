"""SentencePiece tokenizers: `python -m tessera.data.train_tokenizer` trains one on local text
(here a few KB of the synthetic corpus), `spm:PATH` loads it with its special ids (overridden by
Hugging Face config files beside it), an HF import of a SentencePiece-only directory uses it,
and a tokenizer with more ids than the model's vocabulary fails before training or decoding."""

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import sentencepiece

from tessera.configs import load_config
from tessera.convert.importer import tokenizer_for_import
from tessera.data import (
    SentencePieceTokenizer,
    SyntheticSource,
    check_vocab,
    get_tokenizer,
    make_pipeline,
)
from tessera.data import train_tokenizer as tt
from tessera.serve.loading import load_decoder
from tessera.train.tasks import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 120
ENGLISH = ["the quick brown fox jumps over the lazy dog", "hello world, hello tessera"]


def write_corpus(directory) -> tuple[str, str]:
    """corpus.txt (200 synthetic examples and two English lines) and corpus.jsonl (100 more
    examples under "body"): about 5 KB."""
    src = SyntheticSource(seed=0, length=300)
    txt, jsonl = os.path.join(directory, "corpus.txt"), os.path.join(directory, "corpus.jsonl")
    with open(txt, "w") as f:
        f.write("\n".join([*(src[i] for i in range(200)), *ENGLISH]) + "\n\n")
    with open(jsonl, "w") as f:
        for i in range(200, 300):
            f.write(json.dumps({"body": src[i], "id": i}) + "\n")
    return txt, jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(corpus dir, unigram model path, byte-fallback BPE model path)."""
    root = tmp_path_factory.mktemp("spm")
    write_corpus(str(root))
    unigram = tt.train_tokenizer(
        [str(root / "corpus.*")], VOCAB, str(root / "out" / "uni"), text_field="body",
        character_coverage=1.0,
    )
    bpe = tt.train_tokenizer(
        str(root / "corpus.txt"), 300, str(root / "out" / "bpe"), model_type="bpe",
        byte_fallback=True,
    )
    return root, unigram, bpe.model_path


def test_trained_model_and_stats(trained):
    root, stats, _ = trained
    assert stats.model_path == str(root / "out" / "uni.model")
    assert sorted(os.listdir(root / "out")) == ["bpe.model", "bpe.vocab", "uni.model", "uni.vocab"]
    assert (stats.vocab_size, stats.files, stats.sentences) == (VOCAB, 2, 302)
    assert stats.bytes == os.path.getsize(root / "corpus.txt") + os.path.getsize(
        root / "corpus.jsonl"
    )
    assert stats.learned_pieces == VOCAB - 4  # all but pad, eos, unk, bos
    vocab = (root / "out" / "uni.vocab").read_text().splitlines()
    assert [line.split("\t")[0] for line in vocab[:4]] == ["<pad>", "</s>", "<unk>", "<s>"]


def test_round_trip_and_special_ids(trained):
    _, stats, bpe_path = trained
    tok = SentencePieceTokenizer(stats.model_path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 3, VOCAB)
    raw = sentencepiece.SentencePieceProcessor(model_file=stats.model_path)
    src = SyntheticSource(seed=1, length=20)
    for text in [*(src[i] for i in range(20)), *ENGLISH, "rev:abc  =cba"]:
        ids = tok.encode(text)
        assert ids == raw.encode(text) and ids and min(ids) > 3  # no special ids added
        assert tok.decode(ids) == text  # identity normalization keeps runs of spaces
        # Special ids and a model's padded vocabulary rows (>= the piece count) are skipped.
        assert tok.decode(np.array([3, *ids, 1, 0, VOCAB, VOCAB + 7])) == text
    seen = [SyntheticSource(seed=0)[i] for i in range(20)]  # training text: long pieces
    assert sum(len(tok.encode(t)) for t in seen) < 0.8 * sum(map(len, seen))
    with pytest.raises(ValueError, match="^token id -1 is negative$"):
        tok.decode([5, -1])
    assert pickle.loads(pickle.dumps(tok)).encode(ENGLISH[1]) == tok.encode(ENGLISH[1])
    # Without byte fallback an unknown character is <unk>; with it, any text round-trips.
    assert 2 in tok.encode("Ω")
    bpe = SentencePieceTokenizer(bpe_path)
    assert (bpe.pad_id, bpe.eos_id, bpe.bos_id, bpe.vocab_size) == (0, 1, 3, 300)
    text = "ünïcødé ✓ and\nnew lines  "
    assert 2 not in bpe.encode(text) and bpe.decode(bpe.encode(text)) == text


def raw_model(path, **ids) -> str:
    """A tiny SentencePiece model trained directly, with the special ids given (-1: none)."""
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(ENGLISH * 20), model_writer=out, vocab_size=30,
        user_defined_symbols=["<eot>"], minloglevel=2, **ids,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(out.getvalue())
    return path


def test_special_ids_from_the_model_and_hf_config_files(trained, tmp_path):
    _, stats, _ = trained

    def with_config(name, config=None, special_tokens_map=None):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(stats.model_path, d / "tokenizer.model")
        for file, data in (("tokenizer_config.json", config),
                           ("special_tokens_map.json", special_tokens_map)):
            if data is not None:
                (d / file).write_text(json.dumps(data))
        return SentencePieceTokenizer(str(d))

    no_bos = with_config("no_bos", {"add_bos_token": False, "eos_token": "</s>"})
    assert (no_bos.pad_id, no_bos.bos_id, no_bos.eos_id) == (0, None, 1)
    swapped = with_config("swap", {"eos_token": {"content": "<s>"}}, {"bos_token": "</s>"})
    assert (swapped.bos_id, swapped.eos_id, swapped.pad_id) == (1, 3, 0)
    assert swapped.special_tokens == {"eos_token": "<s>", "bos_token": "</s>"}
    with pytest.raises(ValueError, match=r"tokenizer.model: the pad_token '<nope>' is not in the "
                       r"tokenizer's vocab$"):
        with_config("bad", {"pad_token": "<nope>"})

    # A model without pad, bos and eos: eos must come from the config files; pad falls back.
    bare = raw_model(str(tmp_path / "bare" / "tokenizer.model"), unk_id=0, bos_id=-1, eos_id=-1,
                     pad_id=-1)
    with pytest.raises(ValueError, match=r"bare/tokenizer.model: no eos_token in the model or in "
                       r"tokenizer_config.json or special_tokens_map.json beside it; tessera"):
        SentencePieceTokenizer(bare)
    (tmp_path / "bare" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eot>"}))
    tok = SentencePieceTokenizer(bare)
    eot = tok._sp.piece_to_id("<eot>")
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (eot, eot, None)
    assert tok.decode([*tok.encode("hello"), eot]) == "hello"


def test_get_tokenizer_spm_names(trained, tmp_path):
    root, stats, _ = trained
    out = str(root / "out")
    for name, base in ((f"spm:{stats.model_path}", None), ("spm:uni.model", out),
                       (f"spm:{stats.model_path}", str(tmp_path)), ("spm:out/uni.model", root)):
        tok = get_tokenizer(name, base_dir=base)
        assert isinstance(tok, SentencePieceTokenizer) and tok.path == stats.model_path
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(stats.model_path, d / "tokenizer.model")
    assert get_tokenizer("spm:dir", base_dir=str(tmp_path)).path == str(d / "tokenizer.model")
    assert repr(get_tokenizer(f"spm:{d}")) == (
        f"SentencePieceTokenizer('{d}/tokenizer.model', vocab_size={VOCAB})"
    )

    with pytest.raises(FileNotFoundError, match=f"SentencePiece tokenizer {tmp_path}/nowhere "
                       "does not exist"):
        get_tokenizer("spm:nowhere", base_dir=str(tmp_path))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.model in .*/hf \(it has a "
                       r"tokenizer.json: name it hf:.*/hf\)$"):
        get_tokenizer(f"spm:{tmp_path / 'hf'}")
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="^cannot load the SentencePiece model .*broken.model"):
        get_tokenizer(f"spm:{tmp_path / 'broken.model'}")


def test_pipeline_packs_with_the_spm_tokenizer(trained):
    root, stats, _ = trained
    tok = get_tokenizer(f"spm:{stats.model_path}")
    data_cfg = ml_collections.ConfigDict(
        {"source": "text", "path": str(root / "corpus.txt"), "seed": 0}
    )
    batch = next(make_pipeline(data_cfg, tokenizer=tok, global_batch_size=1, seq_len=64,
                               split="eval", vocab_size=VOCAB))
    row = np.append(batch["inputs"][0], batch["targets"][0][-1])
    docs = (root / "corpus.txt").read_text().splitlines()
    first = [tok.bos_id, *tok.encode(docs[0]), tok.eos_id]
    assert row[: len(first)].tolist() == first


def run_cli(*args, capsys):
    """main(args) in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        tt.main(list(args))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_tokenizer_cli(trained, tmp_path, capsys):
    root, _, _ = trained
    code, out, err = run_cli(f"--input={root}/corpus.jsonl", "--text_field=body",
                             "--vocab_size=80", f"--output={tmp_path}/new/tok.model",
                             "--model_type=bpe", "--max_sentences=101", capsys=capsys)
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path}/new/tok.model (bpe, vocab_size 80: 76 learned "
                          "pieces; pad=0, eos=1, unk=2, bos=3) from 1 files, 100 lines, ")
    assert out.rstrip().endswith(f"use it as data.tokenizer=spm:{tmp_path}/new/tok.model")
    assert "train_tokenizer: read 1/1 files, 100 lines" in err
    assert sorted(os.listdir(tmp_path / "new")) == ["tok.model", "tok.vocab"]
    assert get_tokenizer("spm:new/tok.model", base_dir=str(tmp_path)).vocab_size == 80


@pytest.mark.parametrize("args, message", [
    (["--input={tmp}/none*.txt"], r"no data files match {tmp}/none\*.txt$"),
    (["--input={tmp}/empty.txt"], r"data file {tmp}/empty.txt contains no documents$"),
    (["--input={root}/corpus.txt", "--vocab_size=5000"],
     r"--vocab_size=5000 is too large for this text: it yields at most \d+ pieces \(lower "),
    (["--input={root}/corpus.txt", "--vocab_size=20"], "--vocab_size=20 is too small for this "
     r"text: its characters, the special pieces and the byte pieces \(--byte_fallback\) need \d+"),
    (["--input={root}/corpus.jsonl"], r"corpus.jsonl:1: JSON line has no field 'text'$"),
    (["--input={root}/corpus.txt,{tmp}/bad.jsonl"], r"bad.jsonl:2: line is not valid JSON"),
    (["--input={root}/corpus.txt", "--vocab_size=4"], "--vocab_size=4 must be at least 5$"),
    (["--input={root}/corpus.txt", "--max_sentences=100"],
     r"--max_sentences=100 must be 0 \(all lines\) or more than 100$"),
])
def test_train_tokenizer_errors_are_one_line_and_leave_no_file(trained, tmp_path, capsys, args,
                                                               message):
    root, _, _ = trained
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    args = [a.format(tmp=tmp_path, root=root) for a in args]
    if not any(a.startswith("--vocab_size") for a in args):
        args.append("--vocab_size=100")
    code, out, err = run_cli(*args, f"--output={tmp_path}/out/tok", capsys=capsys)
    errors = [line for line in err.splitlines() if line.startswith("tessera: error: ")]
    assert code == 2 and len(errors) == 1 and out == "", err
    assert re.search(message.format(tmp=tmp_path), errors[0]), errors[0]
    leftovers = os.listdir(tmp_path / "out") if (tmp_path / "out").is_dir() else []
    assert leftovers == []  # not even the temporary files


def test_train_tokenizer_module_entry_point(trained, tmp_path):
    root, _, _ = trained
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.data.train_tokenizer", f"--input={root}/corpus.txt",
         "--vocab_size=60", f"--output={tmp_path}/tok", "--byte_fallback"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *sys.path])),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "tessera: error: --vocab_size=60 is too small for this text"
    )
    assert not os.path.exists(tmp_path / "tok.model")


def test_import_of_a_sentencepiece_only_directory(trained, tmp_path):
    _, stats, _ = trained
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(stats.model_path, hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    assert tokenizer_for_import(str(hf), 272) == (
        "spm:tokenizer", f"data.tokenizer='spm:tokenizer' ({VOCAB} ids)"
    )
    name, note = tokenizer_for_import(str(hf), 100)
    assert name == "spm:tokenizer" and f"({VOCAB} ids, more than the model's vocab_size 100: " \
        "training and decode refuse it until model.vocab_size or data.tokenizer changes)" in note
    # A tokenizer.json that does not load: the SentencePiece model is used instead.
    (hf / "tokenizer.json").write_text("{}")
    assert tokenizer_for_import(str(hf), 272)[0] == "spm:tokenizer"
    # Neither loads: byte, with both reasons.
    (hf / "tokenizer.model").write_bytes(b"junk")
    name, note = tokenizer_for_import(str(hf), 272)
    assert name == "byte" and "cannot load the Hugging Face tokenizer" in note
    assert "cannot load the SentencePiece model" in note and note.endswith("stays 'byte'")


def test_import_hf_writes_spm_tokenizer_and_decodes(trained, tmp_path):
    import jax

    from tessera.convert import import_hf
    from tests.convert.helpers import F32, copy_fixture

    _, stats, _ = trained
    src = copy_fixture("llama", str(tmp_path / "hf"))
    shutil.copy(stats.model_path, os.path.join(src, "tokenizer.model"))
    work = str(tmp_path / "work")
    notes = []
    config = import_hf(src, work, overrides=F32, devices=jax.devices()[:1], log=notes.append)
    assert config.data.tokenizer == "spm:tokenizer"
    assert f"tokenizer: data.tokenizer='spm:tokenizer' ({VOCAB} ids)" in notes
    assert os.listdir(os.path.join(work, "tokenizer")) == ["tokenizer.model"]
    loaded = load_config(os.path.join(work, "config.py"))
    decoder, _ = load_decoder(loaded, work, devices=jax.devices()[:1])
    assert isinstance(decoder.tokenizer, SentencePieceTokenizer)
    assert decoder.encode(["hello world"]) == [[3, *decoder.tokenizer.encode("hello world")]]


def test_check_vocab_before_training_and_decoding(trained, tmp_path):
    _, stats, _ = trained
    tok = SentencePieceTokenizer(stats.model_path)
    check_vocab(tok, VOCAB)
    check_vocab(tok, VOCAB + 8)  # padded embedding rows are fine
    with pytest.raises(ValueError, match=rf"^tokenizer SentencePieceTokenizer\('.*uni.model', "
                       rf"vocab_size={VOCAB}\) has {VOCAB} ids but model.vocab_size is 100: raise "
                       rf"model.vocab_size to at least {VOCAB} or use a smaller tokenizer$"):
        check_vocab(tok, 100)

    name = f"spm:{stats.model_path}"
    config = load_config("llama:tiny", {"data.tokenizer": name, "model.vocab_size": 100})
    task = get_task(config, str(tmp_path))
    message = rf"^tokenizer '{name}' has {VOCAB} ids but model.vocab_size is 100"
    with pytest.raises(ValueError, match=message):
        task.make_data("train")
    # Decode refuses it before reading a checkpoint (this workdir has none).
    with pytest.raises(ValueError, match=message):
        load_decoder(config, str(tmp_path))
    ok = get_task(load_config("llama:tiny", {"data.tokenizer": name}), str(tmp_path))
    assert ok.tokenizer.vocab_size == VOCAB  # 120 <= llama:tiny's 259
