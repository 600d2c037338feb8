"""The benchmarks run end to end and report sane figures (no timing is asserted)."""

import jax
import pytest

from tessera.bench.__main__ import main
from tessera.bench.decode import run_decode_bench
from tessera.bench.train import run_train_bench


@pytest.mark.slow
def test_train_bench_reports_throughput_and_mfu(capsys):
    [row] = run_train_bench("llama:tiny", {"data.global_batch_size": "8"},
                            steps=1, devices=jax.devices()[:1])
    assert row["tokens/s"] > 0 and row["TFLOP/s/dev"] > 0
    assert row["peak from"].startswith("cpu matmul probe: ") and row["MFU"].endswith("%")
    assert "train throughput" in capsys.readouterr().out


@pytest.mark.slow
def test_decode_bench_rows(capsys):
    rows = run_decode_bench("mamba2:tiny", {"model.dtype": "float32"}, prompt_len=16,
                            new_tokens=4, batches=(1, 2), contexts=(32, 64), context_steps=2,
                            devices=jax.devices()[:1])
    assert [r["case"] for r in rows] == ["batch 1", "batch 2", "context 32", "context 64"]
    assert all(r["decode_tok_s"] > 0 and r["ms_per_step"] > 0 for r in rows)
    assert "decode: mamba2:tiny" in capsys.readouterr().out


@pytest.mark.slow
def test_decode_bench_prints_the_latent_cache_size(capsys):
    """MLA keeps kv_lora_rank + qk_rope_head_dim values per token and layer: 2 x (64 + 16)
    float32 values plus the int32 slot position."""
    rows = run_decode_bench("deepseek:tiny", {"model.dtype": "float32"}, prompt_len=8,
                            new_tokens=2, batches=(1,), contexts=(), devices=jax.devices()[:1])
    assert [r["cache_bytes_per_token"] for r in rows] == [2 * (64 + 16) * 4 + 4]
    out = capsys.readouterr().out
    assert "cache_bytes_per_token" in out and " 644 " in out.splitlines()[-1] + " "


def test_bench_cli_rejects_unknown_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--config=llama:tiny", "--bogus"])
    assert "unrecognized argument" in capsys.readouterr().err
