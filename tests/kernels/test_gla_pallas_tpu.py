"""Pallas TPU GLA kernels (`tessera.kernels.gla.pallas_tpu`), in interpret mode on CPU: forward
and gradients wrt every input equal the sequential oracle (and the chunked form) for scalar and
per-channel decays, with and without u / h0, resets drawn by hypothesis (chunk starts, twice in a
row, the last token), odd lengths, strong decays (-20 per step: finite and exact), float32 and
bfloat16; SSD through the kernel with groups; dispatch; TPU AOT compiles under shard_map and
the compiled program's temp memory against the sequence length."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tessera.kernels.gla as gla_op
import tessera.kernels.ssd as ssd_op
from tessera.kernels.gla import pallas_tpu, reference
from tessera.kernels.platform import interpreting
from tessera.kernels.ssd import pallas_tpu as ssd_pallas
from tessera.kernels.ssd import reference as ssd_reference
from tests.kernels.tpu import data_tensor_mesh, needs_libtpu

B, T, H, DK, DV = 2, 37, 2, 4, 3
# Static configurations (each compiles once): decay kind, bonus u, initial state, dtype, chunk.
CONFIGS = {
    "channel_u_h0": dict(scalar=False, bonus=True, h0=True, dtype=jnp.float32, n=8),
    "channel_bf16": dict(scalar=False, bonus=False, h0=False, dtype=jnp.bfloat16, n=8),
    "scalar_h0": dict(scalar=True, bonus=False, h0=True, dtype=jnp.float32, n=8),
    "scalar_u_bf16": dict(scalar=True, bonus=True, h0=False, dtype=jnp.bfloat16, n=16),
}


def make_inputs(seed, decay, scalar, dtype, t=T):
    """q, k, v, g, u, h0; g = -decay * exp(normal - 0.5) per step (decay 20: ~-2 .. -100)."""
    key = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(key[0], (B, t, H, DK))
    k = jax.random.normal(key[1], (B, t, H, DK))
    v = jax.random.normal(key[2], (B, t, H, DV))
    g = -decay * jnp.exp(jax.random.normal(key[3], (B, t, H) if scalar else (B, t, H, DK)) - 0.5)
    u = jax.random.normal(key[4], (H, DK))
    h0 = jax.random.normal(key[5], (B, H, DK, DV))
    return (*(a.astype(dtype) for a in (q, k, v)), g, u.astype(dtype), h0)


@functools.cache
def grad_fn(form, n):
    """jit(value_and_grad) of a fixed random linear function of (o, final state) wrt q, k, v,
    g, u, h0 (u, h0 may be None) for ``form`` "pallas", "sequential" or "chunked"."""
    fn = {
        "pallas": functools.partial(pallas_tpu.gla, chunk=n),
        "sequential": reference.sequential,
        "chunked": functools.partial(reference.chunked, chunk_size=n),
    }[form]

    def loss(q, k, v, g, u, h0, reset):
        o, s = fn(q, k, v, g, u=u, h0=h0, reset=reset, scale=0.5)
        wo = jax.random.normal(jax.random.key(1), o.shape)
        ws = jax.random.normal(jax.random.key(2), s.shape)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws), (o, s)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))


def run(form, n, args, reset):
    with interpreting():
        (_, (o, s)), grads = grad_fn(form, n)(*args, reset)
    return [o, s, *(g for g in grads if g is not None)]


def assert_close(got, want, bf16, what):
    """Each output / gradient within the dtype's tolerance relative to its magnitude."""
    names = ["o", "state", "dq", "dk", "dv", "dg", "du", "dh0"]
    rel = 4e-2 if bf16 else 1e-4
    assert len(got) == len(want)
    for name, a, b in zip(names, got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), (what, name)
        np.testing.assert_allclose(a, b, rtol=rel, atol=rel * (np.abs(b).max() + 1e-6),
                                   err_msg=f"{what} {name}")


resets = st.lists(st.sampled_from([0, 5, 8, 15, 16, 17, 30, T - 1]), max_size=5)


@pytest.mark.parametrize("config", CONFIGS)
@settings(max_examples=3, deadline=None)
@example(seed=0, decay=20.0, rows=([0, 8, 16, 17, T - 1], [5, 30]))  # chunk starts, twice, last
@given(seed=st.integers(0, 2**16), decay=st.sampled_from([1.0, 5.0, 20.0]),
       rows=st.tuples(resets, resets))
def test_matches_sequential(config, seed, decay, rows):
    """T = 37 (last chunk partial): o, the final state and the gradients wrt q, k, v, g (and u,
    h0) equal the sequential oracle's, per-step log decays down to ~-100 included."""
    c = CONFIGS[config]
    q, k, v, g, u, h0 = make_inputs(seed, decay, c["scalar"], c["dtype"])
    args = (q, k, v, g, u if c["bonus"] else None, h0 if c["h0"] else None)
    reset = np.zeros((B, T), bool)
    for row, cols in enumerate(rows):
        reset[row, list(cols)] = True
    want = run("sequential", c["n"], args, jnp.asarray(reset))
    got = run("pallas", c["n"], args, jnp.asarray(reset))
    assert_close(got, want, c["dtype"] == jnp.bfloat16, f"{config} decay {decay}")


def test_matches_chunked():
    """Against the chunked XLA form at the same chunk length (a reset at a chunk start)."""
    c = CONFIGS["channel_u_h0"]
    q, k, v, g, u, h0 = make_inputs(3, 1.0, False, jnp.float32)
    reset = jnp.zeros((B, T), bool).at[1, 8].set(True)
    want = run("chunked", c["n"], (q, k, v, g, u, h0), reset)
    got = run("pallas", c["n"], (q, k, v, g, u, h0), reset)
    assert_close(got, want, False, "chunked")


@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_through_the_kernel(groups):
    """SSD (4 heads; one group of B / C read as it is, or 2 groups repeated to heads; h0,
    resets) on the kernels equals ssd's sequential form, forward and gradients wrt every
    input."""
    b, t, h, p, n = 1, 21, 4, 3, 5
    key = jax.random.split(jax.random.key(groups), 7)
    x = jax.random.normal(key[0], (b, t, h, p))
    dt = jax.nn.softplus(jax.random.normal(key[1], (b, t, h)) - 1.0)
    A = -jnp.exp(jax.random.uniform(key[2], (h,), minval=-1.2, maxval=1.4))
    Bm = jax.random.normal(key[3], (b, t, groups, n))
    C = jax.random.normal(key[4], (b, t, groups, n))
    D = jax.random.normal(key[5], (h,))
    h0 = jax.random.normal(key[6], (b, h, p, n))
    reset = jnp.zeros((b, t), bool).at[0, jnp.array([0, 8, 9, t - 1])].set(True)

    def grads(form):
        def loss(*a):
            y, s = form(*a[:6], h0=a[6], reset=reset)
            wy = jax.random.normal(jax.random.key(1), y.shape)
            return jnp.sum(y * wy) + jnp.sum(s * jnp.cos(s)), (y, s)

        with interpreting():
            return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(
                x, dt, A, Bm, C, D, h0)

    got = grads(functools.partial(ssd_pallas.ssd, chunk=8))
    want = grads(ssd_reference.sequential)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_dispatch():
    """Auto picks pallas_tpu in interpret mode for T > 1; for T = 1 the state-step kernel (gla,
    per-channel decay) or the sequential step (ssd); off TPU explain says why; a chunk that is no
    multiple of 8 and bad shapes raise."""
    q, k, v, g, u, h0 = make_inputs(0, 1.0, False, jnp.float32, t=9)
    kw = dict(u=None, h0=None, reset=None, scale=1.0, chunk_size=None)
    x, dt = v, g[..., 0]
    A, D = -jnp.ones((H,)), jnp.ones((H,))
    Bm = C = q[:, :, :1]
    with interpreting():
        assert gla_op.OP.select("auto", q, k, v, g, **kw).name == "pallas_tpu"
        assert gla_op.OP.select("auto", *(a[:, :1] for a in (q, k, v, g)), **kw).name == (
            "pallas_tpu_decode")
        assert ssd_op.OP.select("auto", x, dt, A, Bm, C, D, chunk_size=64).name == "pallas_tpu"
        one = (x[:, :1], dt[:, :1], A, Bm[:, :1], C[:, :1], D)
        assert ssd_op.OP.select("auto", *one, chunk_size=64).name == "sequential"
        with pytest.raises(ValueError, match="gla: k shape"):
            pallas_tpu.gla(q, k[:, :3], v, g)
        with pytest.raises(ValueError, match="chunk must be a multiple of 8, got 12"):
            pallas_tpu.gla(q, k, v, g, chunk=12)
    assert dict(gla_op.OP.explain(q, k, v, g, **kw))["pallas_tpu"] == (
        "a TPU kernel (the program runs on cpu)")
    assert dict(ssd_op.OP.explain(x, dt, A, Bm, C, D, chunk_size=64))["pallas_tpu"] == (
        "a TPU kernel (the program runs on cpu)")


def test_f32_follows_the_default_matmul_precision():
    """At XLA's default matmul precision float32 inputs take one bf16 MXU pass, as XLA's own
    float32 dots do on TPU (close to the oracle at bf16 tolerance; costed as one pass); at
    "highest" (the tests' setting, and any full-float32 setting) they are exact."""
    q, k, v, g, u, h0 = make_inputs(3, 1.0, True, jnp.float32)
    want, _ = reference.sequential(q, k, v, g, h0=h0)
    assert pallas_tpu.matmul_dtype(jnp.float32) == jnp.float32
    full = pallas_tpu._costs(B, H, 2, 16, DK, DV, False, False, 4, False).flops
    with jax.default_matmul_precision("default"):
        assert pallas_tpu.matmul_dtype(jnp.float32) == jnp.bfloat16
        assert pallas_tpu.matmul_dtype(jnp.bfloat16) == jnp.bfloat16
        assert pallas_tpu._costs(B, H, 2, 16, DK, DV, False, False, 4, False).flops < full
        with interpreting():
            got, _ = jax.jit(lambda *a: pallas_tpu.gla(*a, h0=h0))(q, k, v, g)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-2 * scale)
    assert not np.allclose(got, want, rtol=0, atol=1e-5 * scale)  # it did take the bf16 pass


# -- TPU compiles (libtpu on any host) ----------------------------------------------------------
def _compile(mesh, b, t, h, dk, dv, scalar, bonus, grad=True):
    """AOT-compile value_and_grad (or the forward alone) of the kernel on bfloat16 q, k, v
    sharded over batch (data) and heads (tensor)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tessera.sharding.context import use_mesh

    def arg(shape, dtype, *spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))

    tok = ("data", None, "tensor", None)
    args = (arg((b, t, h, dk), jnp.bfloat16, *tok), arg((b, t, h, dk), jnp.bfloat16, *tok),
            arg((b, t, h, dv), jnp.bfloat16, *tok),
            arg((b, t, h) if scalar else (b, t, h, dk), jnp.float32, *tok[:3 if scalar else 4]),
            arg((h, dk), jnp.float32, "tensor", None) if bonus else None,
            arg((b, h, dk, dv), jnp.float32, "data", "tensor"), arg((b, t), bool, "data"))

    def loss(q, k, v, g, u, h0, reset):
        o, s = pallas_tpu.gla(q, k, v, g, u=u, h0=h0, reset=reset, scale=0.5)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 5)) if grad else loss
    with use_mesh(mesh):
        return jax.jit(fn).trace(*args).lower().compile()


@needs_libtpu
@pytest.mark.parametrize(
    "topology, h, dk, dv, scalar, bonus",
    [
        ("v5e-4", 4, 128, 128, False, True),  # RWKV-6 / GLA: per channel with u
        ("v5p-8", 8, 256, 256, True, False),  # RetNet: scalar decay, wide heads
        ("v6e-8", 8, 64, 64, False, True),  # two 64-wide heads per 128-lane block
    ],
)
def test_kernel_compiles_under_shard_map(topology, h, dk, dv, scalar, bonus):
    """Forward and backward kernels, sharded over batch and heads, compile to Mosaic calls."""
    mesh = data_tensor_mesh(topology)
    compiled = _compile(mesh, mesh.shape["data"], 300, h, dk, dv, scalar, bonus)
    text = compiled.as_text()
    assert text.count("tpu_custom_call") >= 2
    assert "tessera_gla_fwd" in text and "tessera_gla_bwd" in text


@needs_libtpu
def test_ssd_kernel_compiles_under_shard_map():
    """Mamba-2's shape (one group of B / C with N = 128, heads of P = 64) through the ssd op on
    v6e-8: the shared-group kernels compile."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tessera.sharding.context import use_mesh

    mesh = data_tensor_mesh("v6e-8")
    b, t, h, p, n = mesh.shape["data"], 300, 8, 64, 128

    def arg(shape, dtype, *spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))

    args = (arg((b, t, h, p), jnp.bfloat16, "data", None, "tensor"),
            arg((b, t, h), jnp.float32, "data", None, "tensor"), arg((h,), jnp.float32, "tensor"),
            arg((b, t, 1, n), jnp.bfloat16, "data"), arg((b, t, 1, n), jnp.bfloat16, "data"),
            arg((h,), jnp.float32, "tensor"))

    def loss(*a):
        y, s = ssd_op.ssd(*a, impl="pallas_tpu")
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

    with use_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)))).trace(
            *args).lower().compile()
    text = compiled.as_text()
    assert "tessera_gla_fwd" in text and "tessera_gla_bwd" in text


@needs_libtpu
@pytest.mark.parametrize("scalar", [True, False], ids=["scalar", "channel"])
def test_forward_temp_memory_is_the_prefix_sums_only(scalar):
    """The compiled forward (token-major q, k, v [B, T, H*D] as projections give them) grows its
    temp bytes with T by no more than the float32 chunk-local prefix sums of g (K floats per
    token and head per channel, one scalar; XLA pads the scalar ones in its tiled layouts): the
    kernels read q, k, v in place and hold only per-chunk VMEM blocks and the [K, V] states.
    (With a gradient the forward also saves each chunk's incoming state, K * V * 4 / L bytes per
    token and head.)"""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tessera.sharding.context import use_mesh

    mesh = data_tensor_mesh("v5p-8")
    b, h, dk, dv = 4, 8, 128, 128

    def temp(t):
        def arg(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data")))

        def fwd(q, k, v, g):
            def heads(a):
                return a.reshape(b, t, h, -1)

            o, s = pallas_tpu.gla(heads(q), heads(k), heads(v), g if scalar else heads(g))
            return o.reshape(b, t, h * dv), s

        args = (arg((b, t, h * dk), jnp.bfloat16), arg((b, t, h * dk), jnp.bfloat16),
                arg((b, t, h * dv), jnp.bfloat16),
                arg((b, t, h) if scalar else (b, t, h * dk), jnp.float32))
        with use_mesh(mesh):
            compiled = jax.jit(fwd).trace(*args).lower().compile()
        assert "tessera_gla_fwd" in compiled.as_text()
        return compiled.memory_analysis().temp_size_in_bytes

    t1, t2 = 1024, 4096
    per_chip = (b // mesh.shape["data"]) * h
    growth = (temp(t2) - temp(t1)) / ((t2 - t1) * per_chip)  # bytes per token and head
    prefix_sums = 160 if scalar else 4 * dk + 32
    assert growth <= prefix_sums, (growth, prefix_sums)
