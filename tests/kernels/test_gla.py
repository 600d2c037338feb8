"""GLA kernel: the chunked and parallel forms agree with the sequential oracle (forward and
gradients wrt q, k, v, g, u, h0) for scalar and per-channel decays, with and without the RWKV-6
bonus, on odd lengths, initial states, resets and strong decays; fla's naive references agree;
padding keeps the state; dispatch and shape errors."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.kernels.gla import IMPLS, OP, gla, reference

GOLDEN = pathlib.Path(__file__).parents[1] / "fixtures" / "fla" / "gla_golden.npz"
TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)
jit_gla = jax.jit(gla, static_argnames=("impl", "chunk_size", "scale"))


def inputs(b=2, t=37, h=2, dk=4, dv=3, scalar=False, seed=0, dtype=jnp.float32, decay=1.0):
    """q, k, v, g, u, h0; g = -decay * exp(normal) (per step log decay, typically -0.1 .. -5)."""
    key = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(key[0], (b, t, h, dk))
    k = jax.random.normal(key[1], (b, t, h, dk))
    v = jax.random.normal(key[2], (b, t, h, dv))
    g = -decay * jnp.exp(jax.random.normal(key[3], (b, t, h) if scalar else (b, t, h, dk)) - 0.5)
    u = jax.random.normal(key[4], (h, dk))
    h0 = jax.random.normal(key[5], (b, h, dk, dv))
    return (*(a.astype(dtype) for a in (q, k, v)), g, u.astype(dtype), h0)


def some_resets(b, t):
    """Resets at the first token, at a chunk start (16), twice in a row, and mid-row."""
    reset = np.zeros((b, t), bool)
    reset[0, [0, 5, 16, 17, 30]] = True
    reset[1, [9, 32, t - 1]] = True
    return jnp.asarray(reset)


def run(form, chunk_size=None):
    if form == "sequential":
        return reference.sequential
    if form == "parallel":
        return reference.parallel
    return lambda *a, **kw: reference.chunked(*a, chunk_size=chunk_size, **kw)


def value_and_grads(fn, q, k, v, g, u, h0, reset, scale=0.5):
    """Outputs, and gradients of a random linear function of (o, final state) wrt q, k, v, g and
    whichever of u, h0 are given."""
    k1, k2 = jax.random.split(jax.random.key(99))
    wo = jax.random.normal(k1, v.shape)
    ws = jax.random.normal(k2, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]))

    def loss(q, k, v, g, u, h0):
        o, s = fn(q, k, v, g, u=u, h0=h0, reset=reset, scale=scale)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws), (o, s)

    argnums = (0, 1, 2, 3) + ((4,) if u is not None else ()) + ((5,) if h0 is not None else ())
    (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(
        q, k, v, g, u, h0
    )
    return o, s, grads


def assert_agree(got, want, name, tol=TOL, grad_tol=GRAD_TOL):
    np.testing.assert_allclose(got[0], want[0], **tol, err_msg=f"{name} o")
    np.testing.assert_allclose(got[1], want[1], **tol, err_msg=f"{name} state")
    assert len(got[2]) == len(want[2])
    for i, (g, w) in enumerate(zip(got[2], want[2])):
        assert np.isfinite(np.asarray(g)).all(), (name, i)
        np.testing.assert_allclose(g, w, **grad_tol, err_msg=f"{name} grad {i}")


CASES = {
    "channel": dict(scalar=False, bonus=False, h0=False, reset=False),
    "channel_u_h0_reset": dict(scalar=False, bonus=True, h0=True, reset=True),
    "scalar_h0_reset": dict(scalar=True, bonus=False, h0=True, reset=True),
    "scalar_u": dict(scalar=True, bonus=True, h0=False, reset=False),
}


@pytest.mark.parametrize("case", CASES)
def test_forms_agree(case):
    """T = 37 with chunks of 16 (last chunk partial) and the parallel form: same o, final state
    and gradients wrt q, k, v, g (and u, h0) as the sequential oracle."""
    c = CASES[case]
    q, k, v, g, u, h0 = inputs(scalar=c["scalar"])
    args = (q, k, v, g, u if c["bonus"] else None, h0 if c["h0"] else None)
    reset = some_resets(2, 37) if c["reset"] else None
    want = value_and_grads(run("sequential"), *args, reset)
    for form in ("chunked", "parallel"):
        assert_agree(value_and_grads(run(form, 16), *args, reset), want, form)


@pytest.mark.parametrize("scalar", [False, True], ids=["channel", "scalar"])
@pytest.mark.parametrize("decay", [5.0, 20.0])
def test_strong_decays(scalar, decay):
    """Per-step log decays around -5 and -20 (down to ~-100) with the default chunk sizes (16 per
    channel, 64 scalar), h0, resets and the bonus: finite, and equal to the oracle at the f32
    tolerance (cumulative log decays reach ~1e3 in a chunk; the chunked form's segment sums
    keep every exponent's error relative to itself)."""
    q, k, v, g, u, h0 = inputs(t=70, scalar=scalar, decay=decay)
    reset = some_resets(2, 70)
    args = (q, k, v, g, u, h0)
    want = value_and_grads(run("sequential"), *args, reset)
    got = value_and_grads(run("chunked"), *args, reset)
    assert_agree(got, want, "chunked")


def test_reset_starts_from_zero():
    """After a reset the outputs equal a fresh run from that token (no h0), and the initial state
    no longer matters."""
    q, k, v, g, u, h0 = inputs(t=20)
    reset = jnp.zeros((2, 20), bool).at[:, 7].set(True)
    for form in ("sequential", "chunked"):
        o, s = run(form, 8)(q, k, v, g, u=u, h0=h0, reset=reset)
        o_tail, s_tail = run(form, 8)(*(a[:, 7:] for a in (q, k, v, g)), u=u)
        np.testing.assert_allclose(o[:, 7:], o_tail, **TOL, err_msg=form)
        np.testing.assert_allclose(s, s_tail, **TOL, err_msg=form)


@pytest.mark.parametrize("scalar", [False, True], ids=["channel", "scalar"])
def test_padding_keeps_the_state(scalar):
    """Tokens with k = v = 0 and g = 0 appended after the sequence (q anything) leave the final
    state as it was."""
    q, k, v, g, u, h0 = inputs(t=21, scalar=scalar)
    _, want = reference.sequential(q, k, v, g, u=u, h0=h0)
    pad = [(0, 0), (0, 14), (0, 0), (0, 0)]
    qp = jnp.pad(q, pad, constant_values=3.0)
    kp, vp, gp = jnp.pad(k, pad), jnp.pad(v, pad), jnp.pad(g, pad[: g.ndim])
    for form in ("sequential", "chunked"):
        _, got = run(form, 16)(qp, kp, vp, gp, u=u, h0=h0)
        np.testing.assert_allclose(got, want, **TOL, err_msg=form)


def test_chunk_sizes_and_single_token():
    """Any chunk size (1, not dividing T, longer than T, the defaults) gives the same result;
    T = 1 too."""
    for scalar in (False, True):
        q, k, v, g, u, h0 = inputs(t=13, scalar=scalar)
        want = reference.sequential(q, k, v, g, u=u, h0=h0, scale=0.5)
        for size in (1, 5, 64, None):
            got = jit_gla(q, k, v, g, u=u, h0=h0, scale=0.5, impl="chunked", chunk_size=size)
            np.testing.assert_allclose(got[0], want[0], **TOL, err_msg=str(size))
            np.testing.assert_allclose(got[1], want[1], **TOL, err_msg=str(size))
        one = [a[:, :1] for a in (q, k, v, g)]
        want = reference.sequential(*one, u=u, h0=h0)
        got = jit_gla(*one, u=u, h0=h0, impl="chunked")
        np.testing.assert_allclose(got[0], want[0], **TOL)
        np.testing.assert_allclose(got[1], want[1], **TOL)


def test_random_sweep():
    """Small random shapes and options (seeded): chunked and parallel equal sequential."""
    rng = np.random.default_rng(0)
    for trial in range(6):
        b, t, h = int(rng.integers(1, 3)), int(rng.integers(2, 30)), int(rng.integers(1, 4))
        dk, dv = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        scalar, bonus = bool(rng.integers(2)), bool(rng.integers(2))
        q, k, v, g, u, h0 = inputs(b, t, h, dk, dv, scalar=scalar, seed=trial,
                                   decay=float(rng.choice([0.1, 1.0, 8.0])))
        reset = jnp.asarray(rng.random((b, t)) < 0.15)
        u = u if bonus else None
        want = reference.sequential(q, k, v, g, u=u, h0=h0, reset=reset, scale=0.3)
        size = int(rng.integers(1, 12))
        for impl, cs in (("chunked", size), ("parallel", None)):
            got = gla(q, k, v, g, u=u, h0=h0, reset=reset, scale=0.3, impl=impl, chunk_size=cs)
            msg = f"trial {trial} {impl} {(b, t, h, dk, dv, scalar, bonus, size)}"
            np.testing.assert_allclose(got[0], want[0], **TOL, err_msg=msg)
            np.testing.assert_allclose(got[1], want[1], **TOL, err_msg=msg)


def test_bf16_inputs_close_to_f32():
    """bf16 q, k, v, u: float32 math inside, o back in bf16, state float32; close to the f32
    oracle run on the same (rounded) inputs."""
    q, k, v, g, u, h0 = inputs(dtype=jnp.bfloat16)
    f32 = [a.astype(jnp.float32) for a in (q, k, v, g, u)]
    want = reference.sequential(*f32[:4], u=f32[4], h0=h0)
    for form in ("chunked", "parallel"):
        o, s = run(form, 16)(q, k, v, g, u=u, h0=h0)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32, form
        np.testing.assert_allclose(np.asarray(o, np.float32), want[0], rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(s, want[1], rtol=1e-4, atol=1e-4)


def test_matches_fla_naive_references():
    """fla's naive_recurrent_rwkv6 (bonus u, h0, final state) and naive_retention (scalar decay
    1 - 2^(-5 - h), scale D^-0.5) on tiny seeded inputs (tools/make_fla_op_golden.py)."""
    ref = np.load(GOLDEN)
    args = [jnp.asarray(ref[f"rwkv6_{n}"]) for n in ("q", "k", "v", "w")]
    for impl in ("sequential", "chunked", "parallel"):
        o, ht = gla(*args, u=jnp.asarray(ref["rwkv6_u"]), h0=jnp.asarray(ref["rwkv6_h0"]),
                    scale=float(ref["rwkv6_scale"]), impl=impl, chunk_size=4)
        np.testing.assert_allclose(o, ref["rwkv6_o"], **TOL, err_msg=impl)
        np.testing.assert_allclose(ht, ref["rwkv6_ht"], **TOL, err_msg=impl)
    q, k, v = (jnp.asarray(ref[f"retention_{n}"]) for n in ("q", "k", "v"))
    b, t, h, d = q.shape
    g = jnp.broadcast_to(jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(h)))), (b, t, h))
    for impl in ("sequential", "chunked", "parallel"):
        o, _ = gla(q, k, v, g, scale=d**-0.5, impl=impl, chunk_size=4)
        np.testing.assert_allclose(o, ref["retention_o"], **TOL, err_msg=impl)


def test_dispatch():
    q, k, v, g, u, _ = inputs(t=9)
    want = reference.sequential(q, k, v, g, u=u)
    for impl in ("auto", "xla", "parallel"):
        got = jit_gla(q, k, v, g, u=u, impl=impl, chunk_size=4)
        np.testing.assert_allclose(got[0], want[0], **TOL, err_msg=impl)
    # auto takes the sequential step for one token (its jaxpr has no chunk cumsums).
    step = jax.make_jaxpr(lambda *a: gla(*a, u=u, impl="auto"))(*(a[:, :1] for a in (q, k, v, g)))
    assert "scan" in str(step) and "cumsum" not in str(step)
    assert IMPLS == ("auto", "pallas_tpu", "sequential", "chunked", "parallel", "xla")
    with pytest.raises(ValueError, match="unknown gla impl 'fast'; valid: auto, pallas_tpu"):
        gla(q, k, v, g, impl="fast")
    reasons = [r for _, r in OP.explain(q, k, v, g, u=None, h0=None, reset=None, scale=1.0,
                                        chunk_size=None)]
    assert reasons[0] == "a TPU kernel (the program runs on cpu)"  # pallas_tpu
    assert reasons[1:] == ["auto skips it: T = 9 > 1 (it is the decode step)", None,
                           "auto skips it: only when named"]
    assert reference.default_chunk_size(g) == 16 and reference.default_chunk_size(g[..., 0]) == 64


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=jnp.ones((2, 9, 8))), r"q must be \[B, T, H, K\]"),
        (dict(k=jnp.ones((2, 9, 2, 3))), r"k shape \(2, 9, 2, 3\), want \(2, 9, 2, 4\)"),
        (dict(v=jnp.ones((2, 8, 2, 3))), r"v shape \(2, 8, 2, 3\) does not fit"),
        (dict(g=jnp.ones((2, 9, 2, 3))), r"g shape \(2, 9, 2, 3\), want \(2, 9, 2, 4\) or"),
        (dict(u=jnp.ones((2, 3))), r"u shape \(2, 3\), want \(2, 4\)"),
        (dict(h0=jnp.ones((2, 2, 4, 4))), r"h0 shape"),
        (dict(reset=jnp.ones((2, 8), bool)), r"reset shape"),
    ],
)
def test_shape_errors(change, message):
    q, k, v, g, _, _ = inputs(t=9)
    args = dict(q=q, k=k, v=v, g=g) | change
    with pytest.raises(ValueError, match=message):
        gla(**args)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        gla(q, k, v, g, impl="chunked", chunk_size=0)
