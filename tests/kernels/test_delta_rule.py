"""delta_rule kernel: the chunked form agrees with the sequential oracle (forward and gradients of
every input, h0 included) on odd lengths, resets mid-row, bf16 inputs, strong decays and a small
random sweep; both match fla's naive DPLR recurrence (golden file); padding keeps the state;
dispatch and shape errors."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.kernels.delta_rule import IMPLS, OP, delta_rule, reference

SEQ = jax.jit(reference.sequential, static_argnames=("scale",))
CHUNKED = jax.jit(reference.chunked, static_argnames=("scale", "chunk_size"))
jit_delta_rule = jax.jit(delta_rule, static_argnames=("impl", "chunk_size"))
TOL = dict(rtol=2e-5, atol=2e-5)
GOLDEN = pathlib.Path(__file__).parents[1] / "fixtures" / "fla" / "delta_rule.npz"
RWKV7_MIN_LOG_DECAY = -float(np.exp(-0.5))  # -0.6065: RWKV-7's w = -exp(-1/2) * sigmoid(.)


def inputs(b=2, t=37, h=3, dk=5, dv=4, seed=0, dtype=jnp.float32):
    """r, w, k, v, a, b, h0 as RWKV-7 makes them: w in [-0.6065, 0], a = -kk,
    b = kk * iclr with kk unit-norm per head and iclr in (0, 1)."""
    ks = jax.random.split(jax.random.key(seed), 7)
    r = jax.random.normal(ks[0], (b, t, h, dk))
    k = 0.5 * jax.random.normal(ks[1], (b, t, h, dk))
    v = jax.random.normal(ks[2], (b, t, h, dv))
    w = RWKV7_MIN_LOG_DECAY * jax.nn.sigmoid(2.0 * jax.random.normal(ks[3], (b, t, h, dk)))
    kk = jax.random.normal(ks[4], (b, t, h, dk))
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = jax.nn.sigmoid(jax.random.normal(ks[5], (b, t, h, dk)))
    h0 = jax.random.normal(ks[6], (b, h, dk, dv))
    return tuple(x.astype(dtype) for x in (r, w, k, v, -kk, kk * iclr, h0))


def some_resets(b, t):
    """Resets at the first token, at a chunk start (16), twice in a row, and near the end."""
    reset = np.zeros((b, t), bool)
    reset[0, [0, 5, 16, 17, 30]] = True
    reset[1, [9, 32, t - 1]] = True
    return jnp.asarray(reset)


def value_and_grads(form, args, h0, reset, **kw):
    """Outputs, and gradients of a random linear function of (o, final state) wrt r, w, k, v, a,
    b (and h0)."""
    r, v = args[0], args[3]
    k1, k2 = jax.random.split(jax.random.key(99))
    wo = jax.random.normal(k1, v.shape)
    ws = jax.random.normal(k2, (r.shape[0], r.shape[2], r.shape[3], v.shape[3]))

    def loss(*xs):
        o, s = form(*xs[:6], h0=None if h0 is None else xs[6], reset=reset, **kw)
        return jnp.sum(o * wo) + jnp.sum(s * ws), (o, s)

    xs = (*args, h0) if h0 is not None else tuple(args)
    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(xs))), has_aux=True))
    (_, (o, s)), grads = fn(*xs)
    return o, s, grads


def assert_agree(got, want, what=""):
    """o and state at TOL, every gradient finite and within 1e-4."""
    tol, gtol = TOL, dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0], want[0], **tol, err_msg=f"{what} o")
    np.testing.assert_allclose(got[1], want[1], **tol, err_msg=f"{what} state")
    for i, (g, w) in enumerate(zip(got[2], want[2])):
        assert np.isfinite(np.asarray(g)).all(), (what, i)
        np.testing.assert_allclose(
            g, w, **gtol, err_msg=f"{what} grad {'rwkvab'[i : i + 1] or 'h0'}"
        )


@pytest.mark.parametrize(
    "use_h0, use_reset", [(False, False), (True, True)], ids=["plain", "h0_reset"]
)
def test_forms_agree(use_h0, use_reset):
    """T = 37 in chunks of 16 (last one partial): same o, final state and gradients wrt r, w, k,
    v, a, b (and h0); resets mid-row, at a chunk start, twice in a row, at the last token."""
    *args, h0 = inputs()
    h0 = h0 if use_h0 else None
    reset = some_resets(2, 37) if use_reset else None
    want = value_and_grads(reference.sequential, args, h0, reset, scale=0.7)
    got = value_and_grads(reference.chunked, args, h0, reset, scale=0.7, chunk_size=16)
    assert_agree(got, want)


def test_matches_fla_golden():
    """fla's naive dplr_recurrence (tools/make_fla_delta_golden.py): o and final state from h0,
    with fla's q scale K^-1/2; both our forms."""
    g = np.load(GOLDEN)
    args = [jnp.asarray(g[n]) for n in ("r", "w", "k", "v", "a", "b")]
    scale = g["r"].shape[-1] ** -0.5
    for name, form in (("sequential", SEQ), ("chunked", CHUNKED)):
        o, s = form(*args, h0=jnp.asarray(g["h0"]), scale=scale)
        np.testing.assert_allclose(o, g["o"], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(s, g["state"], rtol=1e-5, atol=1e-5, err_msg=name)


def test_reset_starts_from_zero():
    """After a reset the outputs equal a fresh run from that token (no h0)."""
    *args, h0 = inputs(t=20)
    reset = jnp.zeros((2, 20), bool).at[:, 7].set(True)
    for form in (SEQ, CHUNKED):
        o, s = form(*args, h0=h0, reset=reset)
        o_tail, s_tail = form(*[x[:, 7:] for x in args])
        np.testing.assert_allclose(o[:, 7:], o_tail, **TOL)
        np.testing.assert_allclose(s, s_tail, **TOL)


@pytest.mark.parametrize(
    "low, high", [(RWKV7_MIN_LOG_DECAY, -0.55), (-30.0, 0.0)], ids=["rwkv7_bound", "beyond"]
)
def test_strong_decays(low, high):
    """Log decays at RWKV-7's bound (every channel in [-0.6065, -0.55] per step: ~-9.7 over a
    chunk of 16) and far beyond it (uniform in [-30, 0], ~-240 over a chunk), with resets:
    finite values and gradients that match the oracle."""
    *args, h0 = inputs(t=40, seed=3)
    args[1] = jax.random.uniform(jax.random.key(5), args[1].shape, minval=low, maxval=high)
    reset = jnp.asarray(np.random.default_rng(0).random((2, 40)) < 0.2)
    want = value_and_grads(reference.sequential, args, h0, reset)
    got = value_and_grads(reference.chunked, args, h0, reset, chunk_size=16)
    assert_agree(got, want, what=f"w in [{low}, {high}]")


def test_padding_keeps_the_state():
    """Tokens with w = k = v = a = b = 0 (and any r) after the sequence leave the final state."""
    *args, h0 = inputs(t=21)
    _, want = SEQ(*args, h0=h0)
    padded = [jnp.pad(x, ((0, 0), (0, 14), (0, 0), (0, 0))) for x in args]
    padded[0] = padded[0].at[:, 21:].set(3.0)
    for form in (SEQ, CHUNKED):
        _, got = form(*padded, h0=h0)
        np.testing.assert_allclose(got, want, **TOL)


def test_random_sweep():
    """Random shapes and chunk sizes (1, not dividing T, longer than T), generic a, b (not the
    RWKV-7 form), random resets, with h0: forward equal to the oracle."""
    rng = np.random.default_rng(1)
    for trial in range(3):
        t, h, dk, dv = (int(rng.integers(1, n)) for n in (30, 3, 7, 7))
        chunk = int(rng.choice([1, 3, 8, 64]))
        ks = jax.random.split(jax.random.key(trial), 8)
        shape = (2, t, h, dk)
        r, k, a, b = (jax.random.normal(kx, shape) * s for kx, s in zip(ks[:4], (1, 1, 0.3, 0.3)))
        w = -jnp.exp(jax.random.normal(ks[4], shape) - 1.0)
        v = jax.random.normal(ks[5], (2, t, h, dv))
        h0 = jax.random.normal(ks[6], (2, h, dk, dv))
        reset = jax.random.uniform(ks[7], (2, t)) < 0.15
        want = SEQ(r, w, k, v, a, b, h0=h0, reset=reset)
        got = CHUNKED(r, w, k, v, a, b, h0=h0, reset=reset, chunk_size=chunk)
        msg = f"T={t} H={h} K={dk} V={dv} chunk={chunk}"
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4, err_msg=msg)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4, err_msg=msg)


def test_bf16_inputs_close_to_f32():
    """bf16 inputs: float32 math inside, o back in bf16, state float32; close to the f32 oracle
    run on the same (rounded) inputs."""
    *args, h0 = inputs(dtype=jnp.bfloat16)
    want = SEQ(*[x.astype(jnp.float32) for x in args], h0=h0)
    for form in (SEQ, CHUNKED):
        o, s = form(*args, h0=h0)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(o, np.float32), want[0], rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(s, want[1], rtol=1e-4, atol=1e-4)


def test_dispatch():
    *args, _ = inputs(t=9)
    want = SEQ(*args)
    for impl in ("auto", "xla", "chunked"):
        got = jit_delta_rule(*args, impl=impl, chunk_size=4)
        np.testing.assert_allclose(got[0], want[0], **TOL, err_msg=impl)
    step = jax.make_jaxpr(lambda *x: delta_rule(*x, impl="auto"))(*[x[:, :1] for x in args])
    assert "scan" in str(step) and "cumsum" not in str(step)
    assert IMPLS == ("auto", "pallas_tpu", "sequential", "chunked", "xla")
    with pytest.raises(ValueError, match="unknown delta_rule impl 'fast'; valid: auto, pallas_tpu"):
        delta_rule(*args, impl="fast")
    assert [
        reason for _, reason in OP.explain(*args, h0=None, reset=None, scale=1.0, chunk_size=None)
    ] == [
        "a TPU kernel (the program runs on cpu)",
        "auto skips it: T = 9 > 1 (it is the decode step)",
        None,
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(w=jnp.ones((2, 9, 3, 4))), r"w shape \(2, 9, 3, 4\), want \(2, 9, 3, 5\)"),
        (dict(v=jnp.ones((2, 8, 3, 4))), r"v shape"),
        (dict(b=jnp.ones((2, 9, 2, 5))), r"b shape"),
        (dict(h0=jnp.ones((2, 3, 4, 5))), r"h0 shape \(2, 3, 4, 5\), want \(2, 3, 5, 4\)"),
        (dict(reset=jnp.ones((2, 8), bool)), r"reset shape"),
        (dict(r=jnp.ones((2, 9, 15))), r"r must be \[B, T, H, K\]"),
    ],
)
def test_shape_errors(change, message):
    r, w, k, v, a, b, _ = inputs(t=9)
    kw = dict(r=r, w=w, k=k, v=v, a=a, b=b, h0=None, reset=None) | change
    with pytest.raises(ValueError, match=message):
        delta_rule(**kw)
