"""The recurrence benchmark's tables: rows per (op, T, runnable impl) with the ratio to the XLA
chunked form, impls auto never picks only when named, kernels registered later listed without
naming them, and the TPU cost's affine fit checked against a third unrolled compile. No timing
is asserted."""

import numpy as np
import pytest

import tessera.kernels.gla as gla_op
from tessera.aot.topology import have_libtpu
from tessera.bench.__main__ import main
from tessera.bench.recurrence import measure_local, measure_tpu
from tessera.kernels.gla import reference
from tessera.kernels.registry import Impl, drop_kwargs

DIV = 64  # one head / 64 channels: tiny shapes


def test_local_rows_ratios_and_declined():
    rows, declined = measure_local(["ssd", "selective_scan"], [64], divisor=DIV, repeats=1)
    got = [(r["op"], r["impl"]) for r in rows]
    assert ("ssd", "chunked") in got and ("selective_scan", "chunked") in got
    assert all(r["fwd+bwd (ms)"] > 0 and r["temp (MiB)"] >= 0 for r in rows)
    assert all(r["vs chunked"] == "1.00x" for r in rows if r["impl"] == "chunked")
    assert declined["ssd"]["associative"] == "only when named (--impls)"
    assert "xla" not in [impl for op, impl in got]  # an alias of chunked, not run twice
    named, _ = measure_local(["ssd"], [64], divisor=DIV, repeats=1, named=["associative"])
    assert "associative" in [r["impl"] for r in named]


def test_a_kernel_registered_later_shows_up(monkeypatch, capsys):
    monkeypatch.setattr(gla_op.OP, "_impls", list(gla_op.OP._impls))  # restored after the test
    gla_op.OP.register(Impl("dummy_later", drop_kwargs(reference.chunked, "chunk_size")),
                       before="sequential")
    main(["recurrence", "--ops=rwkv6", "--lengths=32", f"--local_divisor={DIV}", "--repeats=1",
          "--no-tpu"])
    out = capsys.readouterr().out
    impls = [line.split()[2] for line in out.splitlines() if line.startswith("rwkv6 ")]
    assert impls[0] == "dummy_later" and "chunked" in impls
    assert "not run: rwkv6 parallel: only when named (--impls)" in out


def test_unknown_op_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["recurrence", "--ops=lstm", "--no-tpu"])
    assert "unknown recurrence op(s) ['lstm']" in capsys.readouterr().err


@pytest.mark.skipif(not have_libtpu(), reason="libtpu is not installed")
def test_tpu_rows_and_the_affine_cost_fit():
    """The cost fitted on T = 128, 256 and read at 512 is close to the fit through 512 itself
    (an unrolled compile there): the chunked program's FLOPs are affine in T past one chunk;
    XLA's optimal_seconds nearly (7% apart at these tiny shapes)."""
    def ssd_at_512(cost_lengths):
        rows, _, name = measure_tpu(["ssd"], [512], "v5p-8", batch=1, divisor=DIV,
                                    cost_lengths=cost_lengths, progress=lambda line: None)
        assert name == "v5p-8, 4 devices"
        return next(r for r in rows if r["impl"] == "chunked")

    fitted, exact = ssd_at_512((128, 256)), ssd_at_512((256, 512))
    assert fitted["temp (MiB)"] > 0 and exact["optimal (ms)"] > 0
    np.testing.assert_allclose(fitted["GFLOP"], exact["GFLOP"], rtol=0.02)
    np.testing.assert_allclose(fitted["optimal (ms)"], exact["optimal (ms)"], rtol=0.1)
