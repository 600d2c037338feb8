"""An import whose HF directory has a tokenizer.json uses it: the imported config says
``hf:tokenizer`` (relative to the workdir), and the engine, the decode CLI and fine-tuning
encode text with that tokenizer; without a loadable tokenizer.json the config keeps ``byte``
(SentencePiece-only directories: tests/data/test_sentencepiece.py)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.convert import import_hf
from tessera.convert.importer import tokenizer_for_import
from tessera.data import HFTokenizer
from tessera.serve.loading import load_decoder
from tessera.serve.sampling import SamplingParams
from tessera.train.trainer import train
from tests.convert.helpers import F32, copy_fixture, fixture
from tests.data import tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE = jax.devices()[:1]
PROMPT = "hello world"


def test_tokenizer_choice_without_a_usable_tokenizer_json(tmp_path):
    name, note = tokenizer_for_import(fixture("llama3"), 272)
    assert name == "byte" and note.endswith(
        "has no tokenizer.json or tokenizer.model; data.tokenizer stays 'byte', which is not the "
        "model's tokenizer (--set=data.tokenizer=hf:PATH or spm:PATH names another)"
    )
    (tmp_path / "tokenizer.json").write_text("{}")
    name, note = tokenizer_for_import(str(tmp_path), 272)
    assert name == "byte" and "cannot load the Hugging Face tokenizer" in note
    tiny_tokenizer.write(str(tmp_path))
    assert tokenizer_for_import(str(tmp_path), 272) == (
        "hf:tokenizer", "data.tokenizer='hf:tokenizer' (268 ids)"
    )
    name, note = tokenizer_for_import(str(tmp_path), 200)
    assert name == "hf:tokenizer" and "more than the model's vocab_size 200: training and " \
        "decode refuse it" in note


@pytest.mark.slow
def test_import_with_tokenizer_decodes_text(tmp_path):
    src = copy_fixture("llama", str(tmp_path / "hf"))
    tiny_tokenizer.write(src, special_tokens_map={"pad_token": "<pad>"})
    work = str(tmp_path / "work")
    notes = []
    config = import_hf(src, work, overrides=F32, devices=ONE, log=notes.append)
    assert config.data.tokenizer == "hf:tokenizer"
    # The import notes its dtypes first (tests/convert/test_import_dtype.py), then the tokenizer.
    assert [n for n in notes if not n.startswith("dtype: ")] == [
        "tokenizer: data.tokenizer='hf:tokenizer' (268 ids)"
    ]
    assert sorted(os.listdir(os.path.join(work, "tokenizer"))) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    ]
    loaded = load_config(os.path.join(work, "config.py"))
    assert loaded.data.tokenizer == "hf:tokenizer"

    # The engine encodes text with the imported tokenizer (BOS prepended) and decodes with it.
    decoder, step = load_decoder(loaded, work, devices=ONE)
    tok = HFTokenizer(src)
    assert isinstance(decoder.tokenizer, HFTokenizer) and step == 0
    assert decoder.tokenizer.path == os.path.join(work, "tokenizer", "tokenizer.json")
    (completion,) = decoder.generate([PROMPT], SamplingParams(), 4, stop_tokens=())
    assert completion.prompt_tokens == [tok.bos_id, *tok.encode(PROMPT)]
    assert len(completion.tokens) == 4
    assert completion.text == tok.decode(completion.tokens)
    # A tokenizer without BOS: nothing is prepended.
    no_bos = tiny_tokenizer.write(str(tmp_path / "nobos"), {"eos_token": "</s>"})
    decoder.tokenizer = HFTokenizer(no_bos)
    assert decoder.encode([PROMPT]) == [tok.encode(PROMPT)]

    # The CLI, run from elsewhere: hf:tokenizer is found relative to the workdir.
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.serve.decode", f"--config={work}/config.py",
         f"--workdir={work}", f"--prompt={PROMPT}", "--max_new_tokens=4"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer hf:tokenizer" in proc.stderr
    assert proc.stdout.startswith(PROMPT)

    # Fine-tuning packs documents with it too (hf:tokenizer resolved against the workdir).
    run = load_config(
        os.path.join(work, "config.py"),
        {"train.steps": 1, "data.seq_len": 32, "data.global_batch_size": 2,
         "checkpoint.async_save": False, "train.progress": False, "train.tensorboard": False},
    )
    result = train(run, work, devices=ONE)
    assert result.resumed_from == 0 and result.step == 1 and np.isfinite(result.losses[1])
