"""Selective scan: sequential vs a float64 loop, the three forms against each other (values and
gradients, odd lengths, initial state, resets), padding steps, bf16 inputs, and the dispatch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.kernels.selective_scan import IMPLS, reference, selective_scan

FORMS = {
    "sequential": reference.sequential,
    "associative": reference.associative,
    "chunked": functools.partial(reference.chunked, chunk_size=16),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(seed, b=2, t=37, di=6, n=4, dtype=jnp.float32, resets=False, h0=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, t, di))
    dt = np.log1p(np.exp(rng.normal(size=(b, t, di)) - 1.0))  # softplus: positive
    A = -np.exp(rng.normal(size=(di, n)) * 0.5)
    B = rng.normal(size=(b, t, n))
    C = rng.normal(size=(b, t, n))
    D = rng.normal(size=(di,))
    args = [jnp.asarray(a, dtype) for a in (x, dt)] + [jnp.asarray(A, jnp.float32)]
    args += [jnp.asarray(a, dtype) for a in (B, C)] + [jnp.asarray(D, jnp.float32)]
    kw = {}
    if h0:
        kw["h0"] = jnp.asarray(rng.normal(size=(b, di, n)), jnp.float32)
    if resets:
        r = np.zeros((b, t), bool)
        r[0, [5, 20, 21]] = True
        r[1, [0, 16, 33]] = True  # one reset exactly on a chunk boundary
        kw["reset"] = jnp.asarray(r)
    return args, kw


def naive(x, dt, A, B, C, D, h0=None, reset=None):
    """Float64 loop over batch and time: the independent oracle."""
    x, dt, A, B, C, D = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D))
    b_, t_, di = x.shape
    h = np.zeros((b_, di, A.shape[1])) if h0 is None else np.asarray(h0, np.float64).copy()
    y = np.zeros_like(x)
    for b in range(b_):
        for t in range(t_):
            if reset is not None and reset[b, t]:
                h[b] = 0
            h[b] = np.exp(dt[b, t, :, None] * A) * h[b] + (dt[b, t] * x[b, t])[:, None] * B[b, t]
            y[b, t] = h[b] @ C[b, t] + D * x[b, t]
    return y, h


@pytest.mark.parametrize("h0", [False, True])
@pytest.mark.parametrize("resets", [False, True])
def test_sequential_matches_loop(h0, resets):
    args, kw = make_inputs(0, resets=resets, h0=h0)
    y, h = jax.jit(reference.sequential)(*args, **kw)
    want_y, want_h = naive(*args, **{k: np.asarray(v) for k, v in kw.items()})
    np.testing.assert_allclose(y, want_y, **TOL)
    np.testing.assert_allclose(h, want_h, **TOL)


@pytest.mark.parametrize(
    ("h0", "resets"), [(False, False), (True, True)], ids=["zero_state", "h0_and_resets"]
)
def test_forms_agree_values_and_gradients(h0, resets):
    """T=37 with chunks of 16 (padded last chunk); gradients wrt every float input."""
    args, kw = make_inputs(1, resets=resets, h0=h0)
    rng = np.random.default_rng(2)
    wy = jnp.asarray(rng.normal(size=args[0].shape), jnp.float32)
    wh = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    names = ["x", "dt", "A", "B", "C", "D"] + (["h0"] if h0 else [])

    def loss(form, *diff):
        inner = dict(kw, **({"h0": diff[6]} if h0 else {}))
        y, h = form(*diff[:6], **inner)
        return jnp.sum(y * wy) + jnp.sum(h * wh), (y, h)

    diff = (*args, *([kw["h0"]] if h0 else []))
    results = {}
    for name, form in FORMS.items():
        grad_fn = jax.value_and_grad(
            functools.partial(loss, form), argnums=tuple(range(len(diff))), has_aux=True
        )
        results[name] = jax.jit(grad_fn)(*diff)
    (_, (y_ref, h_ref)), g_ref = results.pop("sequential")
    for name, ((_, (y, h)), g) in results.items():
        np.testing.assert_allclose(y, y_ref, **TOL, err_msg=name)
        np.testing.assert_allclose(h, h_ref, **TOL, err_msg=name)
        for arg, a, b in zip(names, g, g_ref, strict=True):
            scale = float(np.max(np.abs(b)))
            np.testing.assert_allclose(
                a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{name} d/d{arg}"
            )


def test_reset_cuts_off_the_past():
    """After a reset the outputs do not depend on anything before it (inputs or h0)."""
    args, kw = make_inputs(3, h0=True)
    reset = jnp.zeros((2, 37), bool).at[:, 10].set(True)
    form = jax.jit(FORMS["chunked"])
    y, h = form(*args, h0=kw["h0"], reset=reset)
    x2 = args[0].at[:, :10].set(7.0)
    y2, h2 = form(x2, *args[1:], h0=kw["h0"] * 3, reset=reset)
    np.testing.assert_allclose(y2[:, 10:], y[:, 10:], **TOL)
    np.testing.assert_allclose(h2, h, **TOL)
    assert not np.allclose(y2[:, :10], y[:, :10])


@pytest.mark.parametrize("form", list(FORMS))
def test_padding_steps_leave_the_state_unchanged(form):
    """Steps with dt = 0 and x = 0 (what the mixer feeds for padding) keep the state."""
    args, kw = make_inputs(4, t=20, h0=True)
    form = jax.jit(FORMS[form])
    y, h = form(*(a[:, :13] if a.ndim == 3 else a for a in args), **kw)
    x, dt = args[0].at[:, 13:].set(0.0), args[1].at[:, 13:].set(0.0)
    y_pad, h_pad = form(x, dt, *args[2:], **kw)
    np.testing.assert_allclose(h_pad, h, **TOL)
    np.testing.assert_allclose(y_pad[:, :13], y, **TOL)


def test_bf16_inputs_close_to_f32():
    args16, kw = make_inputs(5, dtype=jnp.bfloat16, resets=True, h0=True)
    args32 = [a.astype(jnp.float32) for a in args16]
    y_ref, h_ref = reference.sequential(*args32, **kw)
    for name, form in FORMS.items():
        y, h = jax.jit(form)(*args16, **kw)
        assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32, name
        np.testing.assert_allclose(
            np.asarray(y, np.float32), y_ref, rtol=2e-2, atol=2e-2, err_msg=name
        )
        np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4, err_msg=name)


def test_chunked_backward_keeps_one_state_per_chunk():
    """The custom VJP's residuals hold no [B, T, Di, N] array, only the inputs and one state
    per chunk [chunks, B, Di, N]."""
    args, _ = make_inputs(6, b=1, t=256, di=8, n=16)

    def loss(x):
        return jnp.sum(reference.chunked(x, *args[1:], chunk_size=32)[0])

    _, backward = jax.vjp(loss, args[0])
    sizes = [leaf.size for leaf in jax.tree.leaves(backward)]
    # At most one chunk's worth of [L, Di, N] (or an input [T, N]), never the whole [T, Di, N].
    assert max(sizes) <= 32 * 8 * 16 < 256 * 8 * 16, sizes


def test_dispatch():
    args, kw = make_inputs(7, t=9)
    want, _ = jax.jit(reference.sequential)(*args, **kw)
    for impl in ("auto", "sequential", "associative", "chunked"):
        scan = jax.jit(functools.partial(selective_scan, impl=impl, chunk_size=4))
        y, _ = scan(*args, **kw)
        np.testing.assert_allclose(y, want, **TOL, err_msg=impl)
    assert IMPLS == ("auto", "pallas_tpu", "chunked", "associative", "sequential")
    for impl in ("cuda", "triton"):
        with pytest.raises(ValueError, match=f"unknown selective_scan impl '{impl}'; valid: auto"):
            selective_scan(*args, impl=impl)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(args[0], args[1], args[2], args[3][:, :, :2], *args[4:])
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(*args, chunk_size=0)
