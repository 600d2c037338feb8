"""Pallas GPU (Triton) recurrence kernels on CPU: gla, ssd (through via_gla), selective_scan and
delta_rule in Pallas GPU interpret mode against the sequential oracles (outputs, final states
and gradients wrt every input: odd lengths, h0, resets at chunk starts / twice in a row / the
last token, strong decays, float32 and bfloat16); dispatch; and the Triton lowering of forward
+ backward for an (abstract) H100, which runs on a CPU host up to the Triton IR (no PTX: that
needs a GPU).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tessera.kernels.delta_rule as delta_op
import tessera.kernels.gla as gla_op
import tessera.kernels.selective_scan as scan_op
import tessera.kernels.ssd as ssd_op
from tessera.kernels.delta_rule import pallas_gpu as delta_gpu
from tessera.kernels.delta_rule import reference as delta_ref
from tessera.kernels.gla import pallas_gpu as gla_gpu
from tessera.kernels.gla import reference as gla_ref
from tessera.kernels.platform import interpreting
from tessera.kernels.registry import KernelUnavailableError
from tessera.kernels.selective_scan import pallas_gpu as scan_gpu
from tessera.kernels.selective_scan import reference as scan_ref
from tessera.kernels.ssd import pallas_gpu as ssd_gpu
from tessera.kernels.ssd import reference as ssd_ref
from tests.kernels.test_ssd import inputs as ssd_inputs

F32_TOL, BF16_TOL = 1e-4, 3e-2


def assert_close(got, want, tol, name):
    """Elementwise, with the absolute slack relative to the largest magnitude (tol * max|want|)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(got).all(), name
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=name)


def resets(b, t, seed=None):
    """Resets at the first token, at chunk starts (16, 32), twice in a row, mid-chunk and at the
    last token; or random ones (seeded)."""
    if seed is not None:
        return jnp.asarray(np.random.default_rng(seed).random((b, t)) < 0.15)
    reset = np.zeros((b, t), bool)
    reset[0, [0, 5, 16, 17, 30]] = True
    reset[-1, [9, 32, t - 1]] = True
    return jnp.asarray(reset)


def grads_of(fn, args, argnums, seed=99):
    """Outputs and gradients (wrt ``argnums``) of a random linear function of fn's outputs."""

    def loss(*a):
        outs = fn(*a)
        keys = jax.random.split(jax.random.key(seed), len(outs))
        return sum(jnp.sum(o.astype(jnp.float32) * jax.random.normal(kk, o.shape))
                   for o, kk in zip(outs, keys)), outs

    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*args)
    return (*outs, *grads)


def compare(run_kernel, run_ref, args, argnums, tol, names):
    with interpreting("gpu"):
        got = grads_of(run_kernel, args, argnums)
    want = grads_of(run_ref, args, argnums)
    assert len(got) == len(want) == len(names)
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert_close(g, w, tol, name)


# ------------------------------------------------------------------------------------------
# gla


def gla_inputs(b=2, t=37, h=2, dk=4, dv=3, scalar=False, seed=0, decay=1.0, dtype=jnp.float32):
    """q, k, v, g, u, h0; g = -decay * exp(normal - 0.5) (float32)."""
    key = jax.random.split(jax.random.key(seed), 6)
    q, k = (jax.random.normal(kk, (b, t, h, dk)) for kk in key[:2])
    v = jax.random.normal(key[2], (b, t, h, dv))
    g = -decay * jnp.exp(jax.random.normal(key[3], (b, t, h) if scalar else (b, t, h, dk)) - 0.5)
    u = jax.random.normal(key[4], (h, dk))
    h0 = jax.random.normal(key[5], (b, h, dk, dv))
    return (*(a.astype(dtype) for a in (q, k, v)), g, u.astype(dtype), h0)


def check_gla(scalar, bonus, use_h0, reset, dtype, seed=0, decay=1.0, t=37, dk=4, dv=3):
    q, k, v, g, u, h0 = gla_inputs(t=t, dk=dk, dv=dv, scalar=scalar, seed=seed, decay=decay,
                                   dtype=dtype)
    args, names = [q, k, v, g], ["o", "state", "dq", "dk", "dv", "dg"]
    if bonus:
        args.append(u)
        names.append("du")
    if use_h0:
        args.append(h0)
        names.append("dh0")

    def call(fn):
        def run(q, k, v, g, *rest):
            rest = list(rest)
            u_ = rest.pop(0) if bonus else None
            h0_ = rest.pop(0) if use_h0 else None
            return fn(q, k, v, g, u=u_, h0=h0_, reset=reset, scale=0.5)
        return run

    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    compare(call(gla_gpu.gla), call(gla_ref.sequential), args, tuple(range(len(args))), tol,
            names)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    scalar=st.booleans(), bonus=st.booleans(), use_h0=st.booleans(),
    reset=st.sampled_from([None, "fixed", "random"]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    decay=st.sampled_from([0.3, 2.0, 20.0]), seed=st.integers(0, 2**16),
)
def test_gla_matches_sequential(scalar, bonus, use_h0, reset, dtype, decay, seed):
    """T = 37 (per channel: chunks of 16, the last partial; scalar: chunks of 32), head dims
    4 / 3 padded to 16: o, final state and gradients wrt q, k, v, g (and u, h0)."""
    reset = None if reset is None else resets(2, 37, seed if reset == "random" else None)
    check_gla(scalar, bonus, use_h0, reset, jnp.dtype(dtype), seed=seed, decay=decay)


@pytest.mark.parametrize("scalar", [False, True], ids=["channel", "scalar"])
def test_gla_strong_decays(scalar):
    """Per-step log decays of exactly -20 on every other token (and -0.01 between: the
    in-chunk log-decay sums reach -320 / -640 while the decays between neighbours matter),
    with the bonus, h0 and resets: finite, and equal to the oracle at the float32 tolerance.
    Per channel with head dims 20 / 17 (padded to 32 inside the kernel)."""
    b, t, h = 2, 37, 2
    dk, dv = (4, 3) if scalar else (20, 17)
    q, k, v, g, u, h0 = gla_inputs(b, t, h, dk, dv, scalar=scalar, seed=3)
    steps = jnp.where(jnp.arange(t) % 2 == 0, -20.0, -0.01)
    g = jnp.broadcast_to(steps.reshape(1, t, *(1,) * (g.ndim - 2)), g.shape)
    reset = resets(b, t)

    def call(fn):
        return lambda q, k, v, g, u, h0: fn(q, k, v, g, u=u, h0=h0, reset=reset, scale=0.5)

    compare(call(gla_gpu.gla), call(gla_ref.sequential), (q, k, v, g, u, h0), tuple(range(6)),
            F32_TOL, ["o", "state", "dq", "dk", "dv", "dg", "du", "dh0"])


# ------------------------------------------------------------------------------------------
# ssd through via_gla


def test_ssd_matches_sequential():
    """Groups (4 heads over 2 groups), h0, resets, T = 37 (chunks of 32), float32: y, final
    state and gradients wrt x, dt, A, B, C, D, h0 (bf16 goes through the same gla kernel)."""
    *args, h0 = ssd_inputs()
    reset = resets(2, 37)

    def call(fn):
        return lambda x, dt, A, B, C, D, h0: fn(x, dt, A, B, C, D, h0=h0, reset=reset)

    compare(call(ssd_gpu.ssd), call(ssd_ref.sequential), (*args, h0), tuple(range(7)), F32_TOL,
            ["y", "state", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"])


# ------------------------------------------------------------------------------------------
# selective_scan


def scan_inputs(b=2, t=37, di=6, n=5, seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(k[0], (b, t, di))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, t, di)))
    A = -jnp.exp(jax.random.normal(k[2], (di, n)))
    B = jax.random.normal(k[3], (b, t, n))
    C = jax.random.normal(k[4], (b, t, n))
    D = jax.random.normal(k[5], (di,))
    h0 = jax.random.normal(k[6], (b, di, n))
    return (*(a.astype(dtype) for a in (x, dt, A, B, C, D)), h0)


@settings(max_examples=2, deadline=None, derandomize=True)
@given(use_h0=st.booleans(), reset=st.booleans(), dtype=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 2**16))
def test_selective_scan_matches_sequential(use_h0, reset, dtype, seed):
    """T = 37 (states saved every 32 steps), Di = 70 (two programs' channel blocks of 64: dB, dC
    summed over blocks; the sharded test runs 3 channels a shard), N = 5 padded to 8: y, final
    state and every gradient."""
    *args, h0 = scan_inputs(di=70, seed=seed, dtype=jnp.dtype(dtype))
    reset = resets(2, 37) if reset else None
    names = ["y", "state", "dx", "ddt", "dA", "dB", "dC", "dD"] + (["dh0"] if use_h0 else [])
    if use_h0:
        args.append(h0)

    def call(fn):
        def run(x, dt, A, B, C, D, *h):
            return fn(x, dt, A, B, C, D, h0=h[0] if h else None, reset=reset)
        return run

    tol = F32_TOL if dtype == "float32" else BF16_TOL
    compare(call(scan_gpu.selective_scan), call(scan_ref.sequential), args,
            tuple(range(len(args))), tol, names)


# ------------------------------------------------------------------------------------------
# delta_rule (RWKV-7)


def delta_inputs(b=2, t=37, h=2, dk=5, dv=4, seed=0, dtype=jnp.float32, strong=False):
    """r, w, k, v, a, b, h0 as RWKV-7 makes them (w in [-0.61, 0], a = -kk, b = kk * iclr with
    kk unit-norm); ``strong``: w down to -20."""
    ks = jax.random.split(jax.random.key(seed), 7)
    r = jax.random.normal(ks[0], (b, t, h, dk))
    k = 0.5 * jax.random.normal(ks[1], (b, t, h, dk))
    v = jax.random.normal(ks[2], (b, t, h, dv))
    low = 20.0 if strong else float(np.exp(-0.5))
    w = -low * jax.nn.sigmoid(2.0 * jax.random.normal(ks[3], (b, t, h, dk)))
    kk = jax.random.normal(ks[4], (b, t, h, dk))
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = jax.nn.sigmoid(jax.random.normal(ks[5], (b, t, h, dk)))
    h0 = jax.random.normal(ks[6], (b, h, dk, dv))
    return (*(x.astype(dtype) for x in (r, w, k, v, -kk, kk * iclr)), h0)


@pytest.mark.parametrize("case", ["f32_h0_reset_strong", "bf16"])
def test_delta_rule_matches_sequential(case):
    """T = 37 (states saved every 32 tokens), head dims 5 / 4 padded to 16: o, final state and
    gradients wrt r, w, k, v, a, b (and h0); float32 with h0, resets and log decays down to -20;
    bf16 inputs."""
    f32 = case.startswith("f32")
    *args, h0 = delta_inputs(dtype=jnp.float32 if f32 else jnp.bfloat16, strong=f32)
    reset = resets(2, 37) if f32 else None
    names = ["o", "state", "dr", "dw", "dk", "dv", "da", "db"] + (["dh0"] if f32 else [])
    if f32:
        args.append(h0)

    def call(fn):
        def run(r, w, k, v, a, b, *h):
            return fn(r, w, k, v, a, b, h0=h[0] if h else None, reset=reset, scale=0.5)
        return run

    compare(call(delta_gpu.delta_rule), call(delta_ref.sequential), args,
            tuple(range(len(args))), F32_TOL if f32 else BF16_TOL, names)


# ------------------------------------------------------------------------------------------
# dispatch


def test_dispatch():
    """Auto picks pallas_gpu on a GPU (interpret mode here) for T > 1 and bf16 (f32 too under
    TF32 precision; the conftest asks for 'highest', so f32 stays on XLA for gla / ssd);
    the sequential step for T = 1; on CPU the XLA forms, and the named kernel says why not."""
    q, k, v, g, u, _ = gla_inputs(t=9, dtype=jnp.bfloat16)
    kw = dict(u=u, h0=None, reset=None, scale=1.0, chunk_size=None)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    x, dt, A, B, C, D, _ = ssd_inputs(t=9, dtype=jnp.bfloat16)
    xs, dts, As, Bs, Cs, Ds, _ = scan_inputs(t=9)
    sk = dict(h0=None, reset=None, chunk_size=64)
    kw_delta = dict(h0=None, reset=None, scale=1.0, chunk_size=None)
    with interpreting("gpu"):
        assert gla_op.OP.select("auto", q, k, v, g, **kw).name == "pallas_gpu"
        assert gla_op.OP.select("auto", *(a[:, :1] for a in (q, k, v, g)), **kw).name == (
            "sequential")
        reason = dict(gla_op.OP.explain(*f32, g, **kw))["pallas_gpu"]
        assert "the Triton kernel's dots run at TF32" in reason
        with jax.default_matmul_precision("tensorfloat32"):
            assert gla_op.OP.select("auto", *f32, g, **kw).name == "pallas_gpu"
        assert ssd_op.OP.select("auto", x, dt, A, B, C, D, **sk).name == "pallas_gpu"
        assert ssd_op.OP.select("auto", *(a[:, :1] for a in (x, dt)), A,
                                *(a[:, :1] for a in (B, C)), D, **sk).name == "sequential"
        assert "TF32" in dict(ssd_op.OP.explain(x.astype(jnp.float32), dt, A, B, C, D,
                                                **sk))["pallas_gpu"]
        assert scan_op.OP.select("auto", xs, dts, As, Bs, Cs, Ds, **sk).name == "pallas_gpu"
        assert scan_op.OP.select("auto", xs[:, :1], dts[:, :1], As, Bs[:, :1], Cs[:, :1], Ds,
                                 **sk).name == "sequential"
        dr = delta_inputs(t=9)[:6]
        assert delta_op.OP.select("auto", *dr, **kw_delta).name == "pallas_gpu"
        assert delta_op.OP.select("auto", *(x[:, :1] for x in dr), **kw_delta).name == (
            "sequential")
        assert "dtype int32" in gla_gpu.supports(q.astype(jnp.int32), k, v, g)
        assert "up to 256" in gla_gpu.supports(*(jnp.zeros((1, 2, 1, 300)),) * 3,
                                               jnp.zeros((1, 2, 1)))
        assert "state dim 300" in scan_gpu.supports(xs, dts, jnp.zeros((6, 300)), Bs, Cs, Ds)
        with pytest.raises(ValueError, match=r"gla: k shape"):
            gla_op.gla(q, k[..., :3], v, g, impl="pallas_gpu")
    assert gla_op.OP.select("auto", q, k, v, g, **kw).name == "chunked"
    assert ssd_op.OP.select("auto", x, dt, A, B, C, D, **sk).name == "chunked"
    assert scan_op.OP.select("auto", xs, dts, As, Bs, Cs, Ds, **sk).name == "chunked"
    assert delta_op.OP.select("auto", *delta_inputs(t=9)[:6], **kw_delta).name == "chunked"
    for op, args in ((gla_op.gla, (q, k, v, g)), (ssd_op.ssd, (x, dt, A, B, C, D)),
                     (delta_op.delta_rule, delta_inputs(t=9)[:6]),
                     (scan_op.selective_scan, (xs, dts, As, Bs, Cs, Ds))):
        with pytest.raises(KernelUnavailableError, match=r"a GPU kernel \(the program runs on"):
            op(*args, impl="pallas_gpu")


# ------------------------------------------------------------------------------------------
# Triton lowering (CPU host, abstract H100)


def test_forward_and_backward_lower_to_triton():
    """jit(grad) of each kernel lowers for CUDA on this CPU host (an abstract H100 as the target
    device): every pallas_call becomes a Triton custom call; the Triton IR is built and
    verified here, its compilation to PTX needs a GPU."""
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100", num_cores=132, platform="cuda"))

    def triton_calls(loss, *args):
        fn = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(mesh):
            warnings.simplefilter("ignore", DeprecationWarning)  # Pallas Triton is deprecated
            text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        return text.count("__gpu$xla.gpu.triton")

    b, t, h, d = 2, 100, 2, 64
    q = jnp.zeros((b, t, h, d), jnp.bfloat16)
    reset = jnp.zeros((b, t), bool)
    for g in (jnp.zeros((b, t, h, d)), jnp.zeros((b, t, h))):
        def loss(q, k, v, g, u, h0):
            o, s = gla_gpu.gla(q, k, v, g, u=u, h0=h0, reset=reset)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
        assert triton_calls(loss, q, q, q, g, q[0, 0], jnp.zeros((b, h, d, d))) == 2

    x, dt, A, B = jnp.zeros((b, t, 96)), jnp.zeros((b, t, 96)), jnp.zeros((96, 16)), \
        jnp.zeros((b, t, 16))

    def loss(x, dt, A, B, C):
        y, s = scan_gpu.selective_scan(x, dt, A, B, C, jnp.zeros(96), reset=reset)
        return jnp.sum(y) + jnp.sum(s)

    assert triton_calls(loss, x.astype(jnp.bfloat16), dt, A, B, B) == 2

    def loss(r, w, k, v, a, b_, h0):
        o, s = delta_gpu.delta_rule(r, w, k, v, a, b_, h0=h0, reset=reset)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    assert triton_calls(loss, *(q,) * 6, jnp.zeros((b, h, d, d))) == 2


# ------------------------------------------------------------------------------------------
# under a mesh


def test_sharded_matches_unsharded():
    """Under a data x tensor mesh the kernels run per shard (a shard_map in the program: gla
    splits batch and heads, selective_scan batch and channels); outputs and gradients (u, B, C
    and A are summed over the shards that share them) equal the sequential oracle's."""
    from jax.sharding import Mesh

    from tessera.sharding import MESH_AXES
    from tessera.sharding.context import use_mesh

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 1, 1, 2), MESH_AXES)
    q, k, v, g, u, h0 = gla_inputs(t=20)
    reset = resets(2, 20, seed=1)

    def gla_call(fn):
        return lambda q, k, v, g, u, h0: fn(q, k, v, g, u=u, h0=h0, reset=reset, scale=0.5)

    *args, sh0 = scan_inputs(t=20)

    def scan_call(fn):
        return lambda x, dt, A, B, C, D, h0: fn(x, dt, A, B, C, D, h0=h0, reset=reset)

    with use_mesh(mesh, {"act_ssm_inner": ("tensor",)}):  # mamba's rule for its channels
        for fn, a in ((gla_call(gla_gpu.gla), (q, k, v, g, u, h0)),
                      (scan_call(scan_gpu.selective_scan), (*args, sh0))):
            jaxpr = str(jax.make_jaxpr(fn)(*a))
            assert "shard_map" in jaxpr and "'tensor'" in jaxpr, jaxpr
        compare(gla_call(gla_gpu.gla), gla_call(gla_ref.sequential), (q, k, v, g, u, h0),
                tuple(range(6)), F32_TOL, ["o", "state", "dq", "dk", "dv", "dg", "du", "dh0"])
        compare(scan_call(scan_gpu.selective_scan), scan_call(scan_ref.sequential),
                (*args, sh0), tuple(range(7)), F32_TOL,
                ["y", "state", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"])
