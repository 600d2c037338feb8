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
    rows = run_decode_bench("llama:tiny", {"model.dtype": "float32"}, prompt_len=16,
                            new_tokens=4, batches=(1, 2), contexts=(32, 64), context_steps=2,
                            slots=(96, 192), slots_batch=2, slots_fill=8,
                            devices=jax.devices()[:1], cpu_kernels=("on", "off"))
    cases = ["batch 1", "batch 2", "context 32", "context 64"]
    assert [r["case"] for r in rows] == [c for c in cases for _ in "ab"] + ["slots 96",
                                                                            "slots 224"]
    assert [r["cpu_kernels"] for r in rows[:8]] == ["on", "off"] * 4
    assert all(r["decode_tok_s"] > 0 and r["ms_per_step"] > 0 for r in rows)
    assert rows[-2]["vs_first_slots"] == 1 and rows[-1]["vs_first_slots"] > 0
    assert "decode: llama:tiny" in capsys.readouterr().out


def test_cache_table_compares_latent_and_kv_caches(capsys):
    """Abstract shapes only. MLA keeps kv_lora_rank + qk_rope_head_dim values per token and
    layer (deepseek:tiny: 3 layers x (64 + 16) float32, plus the int32 slot position); a
    Llama block keeps K and V of its KV heads."""
    main(["decode", "--cache_only", "--config=deepseek:tiny", "--config=llama:tiny",
          "--config.model.dtype=float32"])
    out = capsys.readouterr().out
    mla, gqa = 3 * (64 + 16) * 4 + 4, 2 * 2 * 2 * 32 * 4 + 4  # llama:tiny: 2 layers, 2 KV heads
    lines = out.splitlines()
    assert "decode cache per token" in out
    assert f" {mla:,} " in next(line for line in lines if line.startswith("deepseek:tiny"))
    assert f" {gqa:,} " in next(line for line in lines if line.startswith("llama:tiny"))


def test_bench_cli_rejects_unknown_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--config=llama:tiny", "--bogus"])
    assert "unrecognized argument" in capsys.readouterr().err
