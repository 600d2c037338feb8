"""Decoding a trained workdir: parameter restore and its errors, the CLI's building blocks, and
``python -m tessera.serve.decode`` end to end on a tiny training run."""

import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tessera.configs import load_config
from tessera.models.create import ModelSpec
from tessera.serve import SamplingParams, load_decoder, restore_params, single_device_mesh
from tessera.serve.decode import decode_many, eval_synthetic, read_prompts, stream_one, unescape
from tessera.sharding import make_rules
from tessera.train.checkpoints import CheckpointError

from .conftest import reference_greedy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = "llama:tiny,train.steps=3,checkpoint.every=3,train.progress=False,train.tensorboard=False"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from tessera.train.trainer import train

    path = str(tmp_path_factory.mktemp("decode_run"))
    train(load_config(TRAIN), path)
    return path


@pytest.fixture(scope="module")
def loaded(workdir):
    # float32 compute: the cached decode and the uncached oracle then agree to the last bit that
    # decides an argmax of this barely trained model (bfloat16 rounds them apart at near-ties).
    cfg = load_config("llama:tiny,model.dtype=float32")
    decoder, step = load_decoder(cfg, workdir, devices=jax.devices()[:1])
    return decoder, step


@pytest.mark.slow
def test_restores_the_saved_parameters(workdir, loaded):
    decoder, step = loaded
    assert step == 3
    saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "3", "state"))
    # The decoder runs the layers unrolled: the saved stacked arrays, one slice per layer.
    stacked = ModelSpec(load_config("llama:tiny").model)
    assert stacked.scanned and not decoder.spec.scanned
    flat_saved = jax.tree.leaves(stacked.unstack(saved["params"]))
    flat_loaded = jax.tree.leaves(decoder.params)
    assert len(flat_saved) == len(flat_loaded)
    for a, b in zip(flat_saved, flat_loaded):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_restore_errors(workdir, tmp_path):
    spec = ModelSpec(load_config("llama:tiny").model)
    sh = spec.shardings(single_device_mesh(), make_rules())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_params(spec, str(tmp_path / "missing"), sh)
    with pytest.raises(CheckpointError, match=f"no checkpoint found in {tmp_path}"):
        restore_params(spec, str(tmp_path), sh)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 .* \(have \[3\]\)"):
        restore_params(spec, workdir, sh, step=7)
    other = ModelSpec(load_config("llama:tiny,model.mlp_dim=64").model)
    with pytest.raises(CheckpointError, match=r"tensor units/blocks/0/channel/wi_gate has"):
        restore_params(other, workdir, other.shardings(single_device_mesh(), make_rules()))
    with pytest.raises(ValueError, match="model.name='sequence_classifier' is not a decoder LM"):
        load_decoder(load_config("classify:tiny"), workdir)


@pytest.mark.slow
def test_stream_eval_and_batches(loaded):
    decoder, _ = loaded
    greedy = SamplingParams()
    out = io.StringIO()
    completion = stream_one(decoder, "417+38=", greedy, 4, out=out)
    assert out.getvalue() == "417+38=" + completion.text + "\n"
    ref = reference_greedy(decoder.spec, decoder.params, [completion.prompt_tokens], 4)[0]
    assert completion.tokens == ref[: len(completion.tokens)]

    out = io.StringIO()
    correct, total = eval_synthetic(
        decoder, load_config("llama:tiny"), 5, greedy, 4, batch_size=4, out=out
    )
    assert total == 5 and 0 <= correct <= 5
    text = out.getvalue()
    assert re.search(rf"synthetic eval: {correct}/5 correct \(\d+\.\d%\)", text)
    assert len(text.splitlines()) == 6  # five examples and the accuracy

    # Batches of 4 (the last one padded) decode each prompt as the uncached oracle does.
    prompts = ["copy:abc=", "1+1=", "rev:hello=", "x", "sort:dcba="]
    got = decode_many(decoder, prompts, greedy, 4, batch_size=4, progress=False)
    refs = reference_greedy(decoder.spec, decoder.params, [c.prompt_tokens for c in got], 4)
    for c, ref in zip(got, refs):
        stop = ref.index(2) if c.finish_reason == "eos" else 4  # 2: EOS
        assert c.tokens == ref[:stop]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decode_many(decoder, ["a", ""], greedy, 4, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="prompt 0 has 301 tokens"):
        stream_one(decoder, "a" * 300, greedy, 4, out=io.StringIO())


def test_unescape_stop_strings():
    assert [unescape(s) for s in ("\\n", "a\\tb", "é", "\\u00e9")] == ["\n", "a\tb", "é", "é"]


def test_read_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "417+38="}\nplain text\n\n{"prompt": "rev:abc="}\n')
    assert read_prompts(str(path)) == ["417+38=", "plain text", "rev:abc="]
    lines = ["1" * 5000, "[1, 2]", '"quoted"', "null", "[" * 100_000, "3.5"]
    path.write_text("\n".join(lines) + "\n")  # JSON that is not an object: plain text
    assert read_prompts(str(path)) == lines
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: JSON row has no string 'prompt'"):
        read_prompts(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(str(tmp_path / "none.jsonl"))


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "tessera.serve.decode", "--config=llama:tiny", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )


@pytest.mark.slow
def test_cli_prompts_file(workdir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "417+38="}\nrev:hello=\n')
    output = tmp_path / "out.jsonl"
    proc = _cli(
        f"--workdir={workdir}", f"--prompts_file={prompts}", f"--output={output}",
        "--max_new_tokens=5", "--temperature=0.7", "--top_p=0.9", "--seed=3",
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["417+38=", "rev:hello="]
    for r in rows:
        assert set(r) == {"prompt", "completion", "tokens", "finish_reason"}
        assert 1 <= len(r["tokens"]) <= 5
    assert "decoding with step 3" in proc.stderr
    assert re.search(r"prefill: \d+ tokens in .* tok/s", proc.stderr)
    assert re.search(r"decode: \d+ tokens in .* tok/s", proc.stderr)
    assert re.search(r"cache: \d+ bytes/token", proc.stderr)


def test_cli_user_error_is_one_line(tmp_path):
    proc = _cli(f"--workdir={tmp_path}", "--prompt=1+1=")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tessera: error: no checkpoint found in {tmp_path}/checkpoints "
        f"(has {tmp_path} been trained?)"
    )
    assert "Traceback" not in proc.stderr
