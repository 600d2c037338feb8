"""decode --against=hf: the byte accounting of a decode step, the bandwidth probe, and the
harness end to end with a torch-free fake worker (tests/bench/fake_hf_worker.py)."""

import math
import os
import sys

import jax
import pytest

from tessera.bench.__main__ import main
from tessera.bench.against_hf import HFModel, HFWorker, compare_tokens, run_against_hf
from tessera.bench.memory import copy_bandwidth, decode_step_bytes
from tessera.configs import load_config
from tessera.models.create import ModelSpec
from tessera.serve.engine import Decoder

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_hf_worker.py")
TINY = {
    "tiny": HFModel("LlamaForCausalLM", dict(
        model_type="llama", vocab_size=272, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )),
}


def _abstract_decoder(**overrides) -> Decoder:
    return Decoder(ModelSpec(load_config("llama:tiny", overrides).model), None)


def test_step_bytes_llama_tiny_by_hand():
    """llama:tiny: vocab 259, d_model 128, 2 layers of 4 heads / 2 KV heads of 32, MLP 384;
    float32 parameters, bfloat16 cache."""
    per_layer = 128 * 4 * 32 * 2 + 128 * 2 * 32 * 2 + 3 * 128 * 384 + 2 * 128  # q o, k v, mlp
    embed = 259 * 128
    params = 2 * per_layer + embed + 128 + 128 * 259  # layers, embed, final norm, head
    batch, prompt_len, new_tokens = 2, 8, 4
    step = decode_step_bytes(_abstract_decoder(), batch, prompt_len, new_tokens)
    assert step.params == 4 * (params - embed) + 4 * batch * 128  # only the batch's rows
    # per token and row: 2 layers x (K, V) x 2 heads x 32 x 2 bytes + the slot's int32 position;
    # filled on average: the prompt + half the new tokens.
    assert step.kv == (2 * 2 * 2 * 32 * 2 + 4) * batch * (prompt_len + new_tokens / 2)
    assert step.state == 2 * 4 * batch  # the int32 lengths, read and written
    assert step.total == step.params + step.kv + step.state

    tied = decode_step_bytes(_abstract_decoder(**{"model.tie_embeddings": "true"}), 1, 8, 4)
    assert tied.params == 4 * (params - 128 * 259)  # no head; the embedding is read whole


def test_step_bytes_rejects_bad_sizes():
    with pytest.raises(ValueError, match="new_tokens"):
        decode_step_bytes(_abstract_decoder(), 1, 8, 0)


def test_copy_bandwidth_is_positive_and_finite():
    for threads in (None, 2):
        bw = copy_bandwidth(4 * 2**20, repeats=2, threads=threads)
        assert bw > 0 and math.isfinite(bw)
    with pytest.raises(ValueError, match="repeats"):
        copy_bandwidth(1024, repeats=0)


def test_compare_tokens():
    assert compare_tokens([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == (0, None)
    assert compare_tokens([[1, 2, 3], [4, 5, 6]], [[1, 9, 3], [4, 5, 0]]) == (2, 1)
    assert compare_tokens([[1, 2]], [[1, 2, 3]]) == (1, 2)  # a shorter row differs where it ends


def test_missing_hf_python_names_the_setup(capsys):
    with pytest.raises(SystemExit):
        main(["decode", "--against=hf", "--hf_python=/nonexistent/python"])
    err = capsys.readouterr().err
    assert "/nonexistent/python does not exist" in err and "pip install torch" in err


@pytest.mark.slow
def test_against_fake_worker_reports_the_wrong_row(capsys):
    """The fake worker decodes with tessera too but changes token 2 of its last row: one
    mismatching row of two, first at position 2; the table is printed."""
    rows = run_against_hf(
        ["tiny"], batches=(2,), prompt_len=4, new_tokens=5, repeats=2, hf_python=sys.executable,
        worker=FAKE, shapes=TINY, probe_bytes=2**20, devices=jax.devices()[:1],
    )
    [row] = rows
    assert (row["model"], row["batch"], row["mismatches"]) == ("tiny", 2, 1)
    assert row["mismatched_rows"] == "1/2" and row["first_mismatch"] == 2
    assert len(row["hf_seconds"]) == len(row["tessera_seconds"]) == 2
    assert row["hf_tok_s"] > 0 and row["tessera_tok_s"] > 0 and row["tessera_GB_s"] > 0
    assert row["tessera_vs_hf"] == pytest.approx(row["tessera_tok_s"] / row["hf_tok_s"])
    out = capsys.readouterr().out
    assert "decode vs transformers" in out and "mismatched_rows" in out
    assert any(line.startswith("tiny ") and " 1/2 " in line for line in out.splitlines())

    with HFWorker(sys.executable, FAKE) as worker:  # the worker's errors reach the caller
        with pytest.raises(RuntimeError, match="generate before build"):
            worker.request("generate", prompts=[[3, 4]], max_new_tokens=2)
