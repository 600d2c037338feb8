"""The attention benchmark's tables: rows per (T, runnable impl), the plain path skipped past its
scores limit, impls registered later listed without naming them, one tiny TPU AOT row. No timing
is asserted."""

import dataclasses

import jax
import pytest

import tessera.kernels.attention as attn
from tessera.aot.topology import have_libtpu
from tessera.bench.__main__ import main
from tessera.bench.attention import GiB, Problem, measure_local, measure_tpu
from tessera.kernels.attention import reference
from tessera.kernels.registry import Impl, drop_kwargs

PROBLEM = Problem(batch=1, heads=2, kv_heads=1, head_dim=16, dtype="float32")


def test_local_rows_and_columns_skip_the_plain_path_past_its_scores():
    limit = PROBLEM.scores_bytes(128) / GiB  # T = 128 fits, T = 256 does not
    rows, declined = measure_local(PROBLEM, [128, 256], repeats=1, max_scores_gib=limit)
    assert [(r["T"], r["impl"]) for r in rows] == [
        (128, "xla_chunked"), (128, "xla"), (256, "xla_chunked"), (256, "xla")]
    assert list(rows[0]) == ["T", "impl", "fwd+bwd (ms)", "temp (MiB)"]
    assert all(r["fwd+bwd (ms)"] > 0 and r["temp (MiB)"] > 0 for r in rows[:3])
    assert rows[3]["fwd+bwd (ms)"] == "skipped (T*T scores 0.000488 GiB)"
    assert declined["cudnn"].startswith("cuDNN needs a CUDA GPU")
    assert declined["pallas_gpu"].startswith("a GPU kernel")


def test_an_impl_registered_later_shows_up(monkeypatch, capsys):
    monkeypatch.setattr(attn.OP, "_impls", list(attn.OP._impls))  # restored after the test
    plain = drop_kwargs(reference.attention, "block_q", "block_kv", "index_aligned")
    attn.OP.register(Impl("dummy_later", plain), before="xla")
    main(["attention", "--lengths=128", "--heads=2", "--head_dim=16", "--dtype=float32",
          "--repeats=1", "--no-tpu"])
    out = capsys.readouterr().out
    impls = [line.split()[1] for line in out.splitlines() if line.startswith("128 ")]
    assert impls == ["xla_chunked", "dummy_later", "xla"]
    assert "not run: pallas_gpu: a GPU kernel (the program runs on cpu)" in out


@pytest.mark.skipif(not have_libtpu(), reason="libtpu is not installed")
def test_tpu_rows_from_an_aot_compile():
    """The splash kernel, then xla_chunked and xla. T = 1024 is 2 x 2 of xla_chunked's 512
    blocks, 3 of them under the causal mask: costed
    with its loops unrolled, its FLOPs are most of dense attention's forward + backward (6
    matmuls of 2 T^2 D per head); counted once, about a quarter. bfloat16: float32 at the tests'
    'highest' matmul precision compiles several times slower for TPU."""
    problem = dataclasses.replace(PROBLEM, dtype="bfloat16")
    rows, declined, name = measure_tpu(problem, [1024], "v5e-1", max_scores_gib=0)
    assert name == "v5e-1, 1 devices"
    assert [(r["impl"], r["cost"]) for r in rows] == [
        ("pallas_tpu", "unrolled"), ("xla_chunked", "unrolled"), ("xla", "")]
    by_impl = {r["impl"]: r for r in rows}
    chunked = by_impl["xla_chunked"]
    assert list(chunked) == ["T", "impl", "temp (MiB)", "GFLOP", "optimal (ms)", "cost"]
    assert chunked["optimal (ms)"] > 0 and chunked["temp (MiB)"] >= 0
    dense = 6 * 2 * 1024**2 * problem.head_dim * problem.heads / 1e9
    assert chunked["GFLOP"] > 0.5 * dense
    # The splash kernel's Pallas calls carry tessera's cost estimate, so XLA counts them.
    assert by_impl["pallas_tpu"]["GFLOP"] > 0.5 * dense
    assert by_impl["xla"]["temp (MiB)"].startswith("skipped (T*T scores")
    assert "tpu" in declined["cudnn"] and jax.default_backend() == "cpu"
