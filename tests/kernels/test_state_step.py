"""The Pallas TPU one-token state update (`tessera.kernels.state_step`): parity with the
sequential forms of delta_rule and gla (per-channel with the bonus u, per-channel inclusive,
scalar decay) in interpret mode, with resets and a missing h0; dispatch (auto takes it for T = 1
on TPU only where XLA's step moves the state more than once); no gradient; a TPU compile under
shard_map on v5e / v5p / v6e that updates a donated state in place with one pass over it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tessera.kernels.delta_rule as delta_op
import tessera.kernels.gla as gla_op
from tessera.kernels import state_step
from tessera.kernels.platform import interpreting
from tests.kernels.tpu import data_tensor_mesh, needs_libtpu

B, H, K, V = 3, 2, 8, 16
FORMS = ("delta", "gla_bonus", "gla", "gla_scalar")


def _args(form, seed, dtype, with_h0):
    keys = jax.random.split(jax.random.key(seed), 8)
    vec = [jax.random.normal(kk, (B, 1, H, K)) for kk in keys[:4]]
    r, k, a, b = vec
    v = jax.random.normal(keys[4], (B, 1, H, V))
    w = -jnp.exp(jax.random.normal(keys[5], (B, 1, H) if form == "gla_scalar" else (B, 1, H, K)))
    h0 = jax.random.normal(keys[6], (B, H, K, V)) if with_h0 else None
    u = jax.random.normal(keys[7], (H, K))
    if form == "delta":
        a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
        a, b = -a, a * jax.nn.sigmoid(b)
    cast = lambda x: x.astype(dtype)  # noqa: E731
    return cast(r), cast(k), cast(v), w, cast(a), cast(b), cast(u), h0


def _run(form, impl, args, reset, scale=0.5):
    r, k, v, w, a, b, u, h0 = args
    if form == "delta":
        return delta_op.delta_rule(r, w, k, v, a, b, h0=h0, reset=reset, scale=scale, impl=impl)
    return gla_op.gla(r, k, v, w, u=u if form == "gla_bonus" else None, h0=h0, reset=reset,
                      scale=scale, impl=impl)


_JIT = {(f, impl): jax.jit(lambda args, reset, f=f, impl=impl: _run(f, impl, args, reset))
        for f in FORMS for impl in ("pallas_tpu_decode", "sequential")}


@settings(max_examples=6, deadline=None)
@given(form=st.sampled_from(FORMS), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), with_h0=st.booleans(),
       resets=st.lists(st.booleans(), min_size=B, max_size=B))
def test_matches_the_sequential_form(form, seed, dtype, with_h0, resets):
    args = _args(form, seed, dtype, with_h0)
    reset = jnp.asarray(resets)[:, None]
    with interpreting():
        o, s = _JIT[form, "pallas_tpu_decode"](args, reset)
    o_ref, s_ref = _JIT[form, "sequential"](args, reset)
    assert o.dtype == o_ref.dtype and s.dtype == jnp.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), **tol)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)


def test_dispatch_and_no_gradient():
    args = _args("gla_bonus", 0, jnp.float32, True)
    r, k, v, w, a, b, u, h0 = args
    long = jnp.concatenate([r, r], axis=1)
    assert dict(delta_op.OP.explain(r, w, k, v, a, b))["pallas_tpu_decode"] == (
        "a TPU kernel (the program runs on cpu)")
    with interpreting():
        assert delta_op.OP.select("auto", r, w, k, v, a, b).name == "pallas_tpu_decode"
        assert gla_op.OP.select("auto", r, k, v, w, u=u).name == "pallas_tpu_decode"
        scalar = w[..., 0]
        assert dict(gla_op.OP.explain(r, k, v, scalar))["pallas_tpu_decode"] == (
            "auto skips it: scalar decay: XLA's step already moves the state once")
        assert dict(gla_op.OP.explain(long, long, jnp.concatenate([v, v], 1),
                                      jnp.concatenate([w, w], 1)))["pallas_tpu_decode"] == (
            "decode only: T = 2 > 1")
        with pytest.raises(NotImplementedError, match="no gradient"):
            jax.make_jaxpr(jax.grad(
                lambda h0: _run("delta", "pallas_tpu_decode", (*args[:7], h0), None)[1].sum()
            ))(h0)
    with pytest.raises(ValueError, match="a and b together"):
        state_step.step(r, k, v, w, a=a)


@needs_libtpu
@pytest.mark.parametrize("topology, form, heads", [
    ("v5e-4", "delta", 32), ("v5p-8", "gla_bonus", 32), ("v6e-8", "delta", 64)])
def test_compiles_in_place_with_one_pass_over_the_state(topology, form, heads):
    """Rows over data, heads over tensor; the donated state is updated in place (no temporary
    copy) and XLA's bytes come to the state read and written once plus the vectors."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tessera.sharding.context import use_mesh

    mesh = data_tensor_mesh(topology)
    rows, dk = 8 * mesh.devices.size, 64

    def arg(shape, *spec):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P(*spec)))

    vec = arg((rows, 1, heads, dk), "data", None, "tensor")
    state = arg((rows, heads, dk, dk), "data", "tensor")

    def decode(s, r, k, v, w, a, b):
        if form == "delta":
            return delta_op.delta_rule(r, w, k, v, a, b, h0=s)
        return gla_op.gla(r, k, v, w, u=jnp.ones((heads, dk)), h0=s)

    with use_mesh(mesh):
        compiled = jax.jit(decode, donate_argnums=0).trace(state, *[vec] * 6).lower().compile()
    assert "tessera_state_step" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 1024
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    state_bytes = rows * heads * dk * dk * 4 / mesh.devices.size
    assert cost["bytes accessed"] < 1.3 * 2 * state_bytes
