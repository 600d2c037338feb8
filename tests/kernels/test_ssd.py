"""SSD kernel: the sequential, associative and chunked forms agree (forward and gradients) on odd
lengths, groups, initial states and resets; padding keeps the state; dispatch and shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.kernels.ssd import IMPLS, OP, reference, ssd

FORMS = {
    "sequential": jax.jit(reference.sequential),
    "associative": jax.jit(reference.associative),
    "chunked": jax.jit(lambda *a, **kw: reference.chunked(*a, chunk_size=16, **kw)),
}
TOL = dict(rtol=2e-5, atol=2e-5)
jit_ssd = jax.jit(ssd, static_argnames=("impl", "chunk_size"))


def inputs(b=2, t=37, h=4, p=3, g=2, n=5, seed=0, dtype=jnp.float32):
    """x, dt, A, B, C, D, h0 with realistic ranges (dt in ~(0, 1.5), A in ~[-4, -0.3])."""
    k = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(k[0], (b, t, h, p))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, t, h)) - 1.0)
    A = -jnp.exp(jax.random.uniform(k[2], (h,), minval=-1.2, maxval=1.4))
    B = jax.random.normal(k[3], (b, t, g, n))
    C = jax.random.normal(k[4], (b, t, g, n))
    D = jax.random.normal(k[5], (h,))
    h0 = jax.random.normal(k[6], (b, h, p, n))
    return tuple(a.astype(dtype) for a in (x, dt, A, B, C, D, h0))


def some_resets(b, t):
    """Resets at the first token, at a chunk start (16), twice in a row, and near the end."""
    reset = np.zeros((b, t), bool)
    reset[0, [0, 5, 16, 17, 30]] = True
    reset[1, [9, 32, t - 1]] = True
    return jnp.asarray(reset)


def value_and_grads(form, args, h0, reset):
    """Outputs, and gradients of a random linear function of (y, final state) wrt every input."""
    x, dt, A, B, C, D = args
    k1, k2 = jax.random.split(jax.random.key(99))
    shape_y = x.shape
    shape_s = (x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    wy, ws = jax.random.normal(k1, shape_y), jax.random.normal(k2, shape_s)

    def loss(x, dt, A, B, C, D, h0):
        y, s = form(x, dt, A, B, C, D, h0=h0, reset=reset)
        return jnp.sum(y * wy) + jnp.sum(s * ws), (y, s)

    argnums = tuple(range(6 if h0 is None else 7))
    fn = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))
    (_, (y, s)), grads = fn(x, dt, A, B, C, D, h0)
    return y, s, grads


@pytest.mark.parametrize(
    "groups, use_h0, use_reset", [(1, False, False), (2, True, True)], ids=["g1", "g2_h0_reset"]
)
def test_forms_agree(groups, use_h0, use_reset):
    """T = 37 with chunks of 16 (last chunk partial): same y, final state and gradients wrt
    x, dt, A, B, C, D (and h0). One group without h0 or resets; two groups with both (G = 1 with
    h0 and resets: test_strong_decay_and_resets_stay_finite)."""
    x, dt, A, B, C, D, h0 = inputs(g=groups)
    h0 = h0 if use_h0 else None
    reset = some_resets(2, 37) if use_reset else None
    want = value_and_grads(FORMS["sequential"], (x, dt, A, B, C, D), h0, reset)
    for name in ("associative", "chunked"):
        got = value_and_grads(FORMS[name], (x, dt, A, B, C, D), h0, reset)
        np.testing.assert_allclose(got[0], want[0], **TOL, err_msg=f"{name} y")
        np.testing.assert_allclose(got[1], want[1], **TOL, err_msg=f"{name} state")
        for i, (g, w) in enumerate(zip(got[2], want[2])):
            assert np.isfinite(np.asarray(g)).all(), (name, i)
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"{name} grad {i}")


def test_reset_starts_from_zero():
    """After a reset the outputs equal a fresh run from that token (no h0), and the initial state
    no longer matters."""
    x, dt, A, B, C, D, h0 = inputs(t=20)
    reset = jnp.zeros((2, 20), bool).at[:, 7].set(True)
    for form in (FORMS["sequential"], FORMS["chunked"]):
        y, s = form(x, dt, A, B, C, D, h0=h0, reset=reset)
        tail = [a[:, 7:] for a in (x, dt, B, C)]
        y_tail, s_tail = form(tail[0], tail[1], A, tail[2], tail[3], D)
        np.testing.assert_allclose(y[:, 7:], y_tail, **TOL)
        np.testing.assert_allclose(s, s_tail, **TOL)


def test_strong_decay_and_resets_stay_finite():
    """Decays down to exp(-1e3) per step and resets everywhere: finite values and gradients.
    Log-decays summed over a chunk reach ~1e4 here, so their float32 differences carry ~1e-3
    relative error: the tolerance is loose."""
    x, dt, A, B, C, D, h0 = inputs(t=40, g=1)
    dt = dt * 200.0
    reset = jnp.asarray(np.random.default_rng(0).random((2, 40)) < 0.3)
    want = value_and_grads(FORMS["sequential"], (x, dt, A, B, C, D), h0, reset)
    got = value_and_grads(FORMS["chunked"], (x, dt, A, B, C, D), h0, reset)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, rtol=5e-3, atol=1e-3)


def test_padding_keeps_the_state():
    """Tokens with dt = 0 and x = 0 appended after the sequence leave the final state as it was."""
    x, dt, A, B, C, D, h0 = inputs(t=21)
    _, want = reference.sequential(x, dt, A, B, C, D, h0=h0)
    pad = 14
    xp = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    dtp = jnp.pad(dt, ((0, 0), (0, pad), (0, 0)))
    Bp, Cp = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=3.0) for a in (B, C))
    for name in ("sequential", "chunked"):
        _, got = FORMS[name](xp, dtp, A, Bp, Cp, D, h0=h0)
        np.testing.assert_allclose(got, want, **TOL, err_msg=name)


def test_chunk_sizes_and_single_token():
    """Any chunk size (1, not dividing T, longer than T) gives the same result; T = 1 too."""
    x, dt, A, B, C, D, h0 = inputs(t=13)
    want = FORMS["sequential"](x, dt, A, B, C, D, h0=h0)
    for size in (1, 5, 64):
        got = jit_ssd(x, dt, A, B, C, D, h0=h0, impl="chunked", chunk_size=size)
        np.testing.assert_allclose(got[0], want[0], **TOL, err_msg=str(size))
        np.testing.assert_allclose(got[1], want[1], **TOL, err_msg=str(size))
    one = [a[:, :1] for a in (x, dt, B, C)]
    want = FORMS["sequential"](one[0], one[1], A, one[2], one[3], D, h0=h0)
    got = jit_ssd(one[0], one[1], A, one[2], one[3], D, h0=h0, impl="chunked")
    np.testing.assert_allclose(got[0], want[0], **TOL)
    np.testing.assert_allclose(got[1], want[1], **TOL)


def test_bf16_inputs_close_to_f32():
    """bf16 inputs: float32 math inside, y back in bf16, state float32; close to the f32 oracle
    run on the same (rounded) inputs."""
    args = inputs(dtype=jnp.bfloat16)
    want = reference.sequential(*[a.astype(jnp.float32) for a in args[:6]], h0=args[6])
    for name in ("associative", "chunked"):
        y, s = FORMS[name](*args[:6], h0=args[6])
        assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(y, np.float32), want[0], rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(s, want[1], rtol=1e-4, atol=1e-4)


def test_dispatch():
    x, dt, A, B, C, D, _ = inputs(t=9)
    want = FORMS["sequential"](x, dt, A, B, C, D)
    for impl in ("auto", "xla"):  # both the chunked form
        got = jit_ssd(x, dt, A, B, C, D, impl=impl, chunk_size=4)
        np.testing.assert_allclose(got[0], want[0], **TOL, err_msg=impl)
    # auto takes the sequential step for one token (its jaxpr has no chunk einsums).
    step = jax.make_jaxpr(lambda *a: ssd(*a, impl="auto"))(
        *[a[:, :1] for a in (x, dt)], A, B[:, :1], C[:, :1], D
    )
    assert "scan" in str(step) and "cumsum" not in str(step)
    assert IMPLS == ("auto", "pallas_tpu", "sequential", "chunked", "associative", "xla")
    with pytest.raises(ValueError, match="unknown ssd impl 'fast'; valid: auto, pallas_tpu"):
        ssd(x, dt, A, B, C, D, impl="fast")
    assert [reason for _, reason in OP.explain(x, dt, A, B, C, D, h0=None, reset=None,
                                                 chunk_size=4)] == [
        "a TPU kernel (the program runs on cpu)",
        "auto skips it: T = 9 > 1 (it is the decode step)", None, "auto skips it: only when named"
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dt=jnp.ones((2, 9, 3))), r"dt shape \(2, 9, 3\), want \(2, 9, 4\)"),
        (dict(A=jnp.ones((3,))), r"A shape \(3,\), want \(4,\)"),
        (dict(B=jnp.ones((2, 9, 3, 5))), r"heads \(4\) must be a multiple of groups \(3\)"),
        (dict(C=jnp.ones((2, 9, 2, 4))), r"C shape \(2, 9, 2, 4\), want \(2, 9, 2, 5\)"),
        (dict(h0=jnp.ones((2, 4, 3, 4))), r"h0 shape"),
        (dict(reset=jnp.ones((2, 8), bool)), r"reset shape"),
        (dict(x=jnp.ones((2, 9, 12))), r"x must be \[B, T, H, P\]"),
    ],
)
def test_shape_errors(change, message):
    x, dt, A, B, C, D, _ = inputs(t=9)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, h0=None, reset=None) | change
    with pytest.raises(ValueError, match=message):
        ssd(**args)


def test_via_gla_matches_the_oracle():
    """SSD through the gla op (scalar decay, S = h^T; how the Pallas GLA kernels serve SSD)
    equals the sequential form, forward and gradients, with groups, h0 and resets."""
    from tessera.kernels.gla import reference as gla_reference
    from tessera.kernels.ssd.via_gla import via_gla

    *args, h0 = inputs()
    reset = some_resets(2, 37)
    form = jax.jit(via_gla(lambda *a, **kw: gla_reference.chunked(*a, **kw | {"chunk_size": 16})))
    got, want = value_and_grads(form, args, h0, reset), value_and_grads(
        FORMS["sequential"], args, h0, reset
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
