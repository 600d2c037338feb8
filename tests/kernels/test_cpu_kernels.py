"""tessera's CPU decode kernels (`tessera.kernels.cpu`, ``kernels.cc``): the ``cpu`` dense impl
and the ``cpu_decode`` attention impl against XLA, forward and gradients, at decode shapes
(1 to 16 rows, several weights per call, ragged widths), repeated calls (no job's partial sums
leak into another), results independent of thread timing, when auto picks them and why it does
not, the build cache and its errors, one thread, and a build without AVX-512 (the portable
paths) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tessera.kernels.attention as attn
from tessera.kernels import cpu
from tessera.kernels.attention import reference
from tessera.kernels.dense import MAX_ROWS, OP, dense, dense_many
from tessera.kernels.registry import KernelUnavailableError
from tests.kernels.test_attention import make_inputs

F32 = dict(atol=2e-5, rtol=2e-5)

# The kernels are built with the host's C++ compiler; without one they cannot exist here (auto
# then runs XLA, which the rest of the suite covers).
pytestmark = pytest.mark.skipif(cpu._compiler() is None, reason="no C++ compiler on this host")


def test_kernels_build_here():
    """With a C++ compiler the kernels must build and load, else every test below would fail
    with the reason."""
    assert cpu.load() is None


def _weights(rng, k, widths):
    """Scaled by 1/sqrt(K), so products of unit inputs are O(1) and F32 fits their rounding."""
    return tuple(jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
                 for n in widths)


# rows, K, widths: one row (column chunks), 2 / 3 / 16 rows (row blocks and 8-, 4-, 2-, 1-row
# tiles), widths that are not multiples of 16 or of a chunk, K not a multiple of 4.
CASES = [
    (1, 512, (512, 256, 256)),
    (1, 37, (100, 3, 129)),
    (2, 64, (48,)),
    (3, 96, (1536, 7)),
    (16, 512, (259,)),
    (16, 131, (512, 40, 16)),
]


@pytest.mark.parametrize("rows,k,widths", CASES)
def test_dense_matches_xla(rows, k, widths):
    rng = np.random.default_rng(rows * 1000 + k)
    x = jnp.asarray(rng.standard_normal((rows, 1, k)), jnp.float32)
    ws = _weights(rng, k, widths)
    got = jax.jit(lambda x, ws: dense_many(x, ws, impl="cpu"))(x, ws)
    want = dense_many(x, ws, impl="xla")
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape == (rows, 1, w.shape[-1])
        np.testing.assert_allclose(g, w, **F32)


def test_dense_contracts_two_axes_and_differentiates():
    """Attention's output projection form ([B, T, H, Dh] with [H, Dh, D]); the custom VJP's
    gradients equal XLA's."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 1, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 16, 96)), jnp.float32)
    got = dense(x, w, contract=2, impl="cpu")
    np.testing.assert_allclose(got, dense(x, w, contract=2, impl="xla"), **F32)

    def loss(impl):
        return lambda x, w: jnp.sum(jnp.sin(dense(x, w, contract=2, impl=impl)))

    g_cpu = jax.grad(loss("cpu"), argnums=(0, 1))(x, w)
    g_xla = jax.grad(loss("xla"), argnums=(0, 1))(x, w)
    for a, b in zip(g_cpu, g_xla, strict=True):
        np.testing.assert_allclose(a, b, **F32)
    ws = _weights(rng, 16, (24, 40))
    xs = x[:, :, 0]

    def many(impl):
        return lambda x, ws: sum(jnp.sum(y**2) for y in dense_many(x, ws, impl=impl))

    for a, b in zip(jax.tree.leaves(jax.grad(many("cpu"), argnums=(0, 1))(xs, ws)),
                    jax.tree.leaves(jax.grad(many("xla"), argnums=(0, 1))(xs, ws)), strict=True):
        np.testing.assert_allclose(a, b, **F32)


def test_repeated_calls_never_mix_jobs():
    """200 calls in one program, each a new input and alternating shapes, so the helper thread
    is sometimes late to a job the caller already finished: nothing of an earlier job may leak
    into a later one (a first design added a late helper's stale partial sums, and greedy decode
    drifted after ~30 tokens; this test failed on it)."""
    rng = np.random.default_rng(2)
    w_a = _weights(rng, 64, (96, 32, 32))
    w_b = _weights(rng, 96, (64,))

    def run(impl):
        def body(i, x):
            q, k, v = dense_many(x, w_a, impl=impl)
            y = jnp.concatenate([q[..., :32] * k, v], -1)  # [16, 1, 64]
            z = dense(jnp.concatenate([y, q[..., 32:64]], -1), w_b[0], impl=impl)
            return jnp.tanh(z + 0.01 * i)

        return jax.jit(lambda x: jax.lax.fori_loop(0, 100, body, x))

    x = jnp.asarray(rng.standard_normal((16, 1, 64)), jnp.float32)
    np.testing.assert_allclose(run("cpu")(x), run("xla")(x), atol=1e-4, rtol=1e-4)


def test_results_do_not_depend_on_thread_timing():
    """16 rows: the slices' partial sums are added in slice order whichever thread ran them, so
    50 runs of one call (with other work between, moving the helper's timing) are bitwise
    equal."""
    rng = np.random.default_rng(3)
    ws = _weights(rng, 1536, (512,)) + _weights(rng, 1536, (300,))
    x = jnp.asarray(rng.standard_normal((16, 1, 1536)), jnp.float32)
    run = jax.jit(lambda x, ws: dense_many(x, ws, impl="cpu"))
    first = [np.asarray(y) for y in run(x, ws)]
    for i in range(50):
        if i % 3 == 0:
            np.asarray(jnp.sum(x * i))  # other work between calls
        for y, want in zip(run(x, ws), first, strict=True):
            np.testing.assert_array_equal(np.asarray(y), want)


def test_auto_picks_the_kernel_for_decode_steps_only():
    x1 = jnp.zeros((4, 1, 32), jnp.float32)
    w = jnp.zeros((32, 8), jnp.float32)
    # outside a decode program (a one-token product in training): XLA
    assert "not in a decode program" in dict(OP.explain(x1, (w,), contract=1))["cpu"]
    with cpu.decoding():
        _check_decode_reasons(x1, w)


def _check_decode_reasons(x1, w):
    assert OP.explain(x1, (w,), contract=1)[0] == ("cpu", None)
    reasons = dict(OP.explain(jnp.zeros((4, 2, 32), jnp.float32), (w,), contract=1))
    assert "not a decode step" in reasons["cpu"] and reasons["xla"] is None
    reasons = dict(OP.explain(x1.astype(jnp.bfloat16), (w.astype(jnp.bfloat16),), contract=1))
    assert "float32 only" in reasons["cpu"]
    wide = jnp.zeros((MAX_ROWS + 1, 1, 32), jnp.float32)
    assert f"> MAX_ROWS = {MAX_ROWS}" in dict(OP.explain(wide, (w,), contract=1))["cpu"]
    with cpu.disabled():
        assert "disabled()" in dict(OP.explain(x1, (w,), contract=1))["cpu"]
        with pytest.raises(KernelUnavailableError, match="turned off"):
            dense(x1, w, impl="cpu")
    with pytest.raises(ValueError, match="do not match"):
        dense(x1, jnp.zeros((31, 8), jnp.float32))


ATTN_CASES = [  # B, S, Hq, Hkv, D, Dv, window
    (1, 128, 8, 4, 64, 64, None),
    (3, 19, 4, 2, 8, 8, None),
    (3, 19, 4, 1, 24, 16, 5),   # MQA, Dv != D, D not a multiple of 16, window
    (2, 50, 12, 6, 16, 32, None),
    (16, 33, 8, 4, 64, 64, 12),
]


@pytest.mark.parametrize("b,s,hq,hkv,d,dv,window", ATTN_CASES)
def test_decode_attention_matches_reference(b, s, hq, hkv, d, dv, window):
    """Empty slots, packed segments, a row that sees nothing (segment 0 -> zeros), a window."""
    rng = np.random.default_rng(b * 100 + s)
    q, k, v = make_inputs(int(rng.integers(100)), b, 1, s, hq, hkv, d, dv=dv)
    kv_pos = jnp.asarray(rng.integers(-1, s, (b, s)), jnp.int32)
    q_seg = jnp.asarray(rng.integers(1, 3, (b, 1)), jnp.int32).at[-1].set(0)
    kw = dict(q_positions=jnp.asarray(rng.integers(s // 2, s, (b, 1)), jnp.int32),
              kv_positions=kv_pos, q_segment_ids=q_seg,
              kv_segment_ids=jnp.asarray(rng.integers(0, 3, (b, s)), jnp.int32),
              kv_valid=kv_pos >= 0, sliding_window=window, scale=0.3 if window else None)
    got = jax.jit(lambda q, k, v: attn.attention(q, k, v, impl="cpu_decode", **kw))(q, k, v)
    want = reference.attention(q, k, v, **kw)
    assert got.shape == (b, 1, hq, dv) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, **F32)
    assert not np.asarray(got[-1]).any()
    def picked():
        return [n for n, why in attn.OP.explain(q, k, v, **kw, index_aligned=False,
                                                block_q=None, block_kv=None) if why is None]

    assert picked()[0] == "xla_decode"  # not in a decode program
    with cpu.decoding():
        assert picked()[0] == "cpu_decode"


def test_decode_attention_gradients_are_the_references():
    """A one-query attention in training (ViT's MAP head): XLA's gradients of the same math."""
    q, k, v = make_inputs(4, 3, 1, 21, 4, 2, 8, dv=16)
    kv_pos = jnp.tile(jnp.arange(21, dtype=jnp.int32)[None], (3, 1))
    kw = dict(q_positions=jnp.asarray([[20], [9], [3]], jnp.int32), kv_positions=kv_pos,
              kv_valid=kv_pos < 18, causal=True)
    cot = jnp.asarray(np.random.default_rng(0).standard_normal((3, 1, 4, 16)), jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attn.attention(q, k, v, impl=impl, **kw) * cot)

    got = jax.grad(loss("cpu_decode"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda q, k, v: jnp.sum(reference.attention(q, k, v, **kw) * cot),
                    argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, **F32)


def test_decode_attention_declines():
    q, k, v = make_inputs(0, 2, 1, 8, 4, 2, 8)
    pos = dict(q_positions=jnp.full((2, 1), 7, jnp.int32),
               kv_positions=jnp.tile(jnp.arange(8, dtype=jnp.int32)[None], (2, 1)))
    reasons = dict(attn.OP.explain(q, k, v, **pos, logit_soft_cap=5.0))
    assert "soft cap" in reasons["cpu_decode"] and reasons["xla_decode"] is None
    reasons = dict(attn.OP.explain(*(a.astype(jnp.bfloat16) for a in (q, k, v)), **pos))
    assert "float32 only" in reasons["cpu_decode"]
    reasons = dict(attn.OP.explain(q.repeat(2, 1), k, v, **pos))
    assert "one query token" in reasons["cpu_decode"]


def test_build_is_cached_and_errors_are_clear(tmp_path, monkeypatch):
    assert cpu.load() is None  # built (or found) once per process, then reused
    compiler = cpu._compiler()
    assert os.path.exists(cpu.library_path(compiler))
    monkeypatch.setenv("TESSERA_KERNEL_CACHE", str(tmp_path))
    assert cpu.library_path(compiler).startswith(str(tmp_path))
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'kernels.cc:1: error: no such header' >&2\nexit 1\n")
    broken.chmod(0o755)
    out = str(tmp_path / "x.so")
    with pytest.raises(RuntimeError, match="cxx failed on kernels.cc: .*error: no such header"):
        cpu.build(str(broken), out)
    assert os.listdir(tmp_path) == ["cxx"]  # no partial library left behind


PORTABLE = """
import jax, jax.numpy as jnp, numpy as np
import tessera.kernels.attention as attn
from tessera.kernels import cpu
from tessera.kernels.dense import dense_many
assert cpu.load() is None
rng = np.random.default_rng(0)
for rows, widths in ((1, (70, 33)), (5, (64, 9))):
    x = jnp.asarray(rng.standard_normal((rows, 1, 45)), jnp.float32)
    ws = tuple(jnp.asarray(rng.standard_normal((45, n)), jnp.float32) for n in widths)
    for g, w in zip(dense_many(x, ws, impl="cpu"), dense_many(x, ws, impl="xla")):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
           for s in ((2, 1, 4, 16), (2, 21, 2, 16), (2, 21, 2, 16)))
kw = dict(q_positions=jnp.full((2, 1), 15, jnp.int32),
          kv_positions=jnp.tile(jnp.arange(21, dtype=jnp.int32)[None], (2, 1)))
np.testing.assert_allclose(attn.attention(q, k, v, impl="cpu_decode", **kw),
                           attn.attention(q, k, v, impl="xla_decode", **kw), atol=2e-5, rtol=2e-5)
print("portable ok")
"""


def _run_portable(**env):
    done = subprocess.run([sys.executable, "-c", PORTABLE], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "portable ok" in done.stdout


def test_portable_build_without_avx512(tmp_path):
    """Built for x86-64-v3 (AVX2, no AVX-512): the portable loops give the same results."""
    _run_portable(TESSERA_CPU_KERNELS_MARCH="x86-64-v3", TESSERA_KERNEL_CACHE=str(tmp_path),
                  JAX_PLATFORMS="cpu")
    assert len(list(tmp_path.glob("cpu_kernels-*.so"))) == 1


def test_one_thread():
    """TESSERA_CPU_KERNELS_THREADS=1: no helper thread, the caller runs every chunk."""
    _run_portable(TESSERA_CPU_KERNELS_THREADS="1", JAX_PLATFORMS="cpu")
