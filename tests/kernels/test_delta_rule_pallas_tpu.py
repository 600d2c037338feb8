"""The Pallas TPU delta_rule kernels (`tessera.kernels.delta_rule.pallas_tpu`): forward and
gradients wrt every input equal `reference.sequential` in interpret mode (odd T, h0, resets at
chunk starts / twice in a row / the last token, RWKV-7-like and much stronger decays, bf16 with
two head groups), forward equal to `reference.chunked`; dispatch; TPU compiles of forward +
backward under shard_map (v5e / v5p / v6e) and temp memory that does not grow with T."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.kernels.delta_rule import OP, delta_rule, pallas_tpu, reference
from tessera.kernels.platform import interpreting
from tests.kernels.tpu import data_tensor_mesh, needs_libtpu

RWKV7_MIN_LOG_DECAY = -float(np.exp(-0.5))
SHAPE = (2, 37, 2, 5, 4)  # B, T, H, K, V: chunks 16 + 16 + 5 (the last one partial)


def rwkv7_inputs(key, shape, dtype=jnp.float32, low=RWKV7_MIN_LOG_DECAY, high=0.0):
    """r, w, k, v, a, b, h0 as RWKV-7 makes them (a = -kk, b = kk * iclr, kk unit-norm, iclr in
    (0, 1)), log decays w uniform in [low, high]."""
    bsz, t, h, dk, dv = shape
    ks = jax.random.split(key, 7)
    r = jax.random.normal(ks[0], (bsz, t, h, dk))
    k = 0.5 * jax.random.normal(ks[1], (bsz, t, h, dk))
    v = jax.random.normal(ks[2], (bsz, t, h, dv))
    w = jax.random.uniform(ks[3], (bsz, t, h, dk), minval=low, maxval=high)
    kk = jax.random.normal(ks[4], (bsz, t, h, dk))
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = jax.nn.sigmoid(jax.random.normal(ks[5], (bsz, t, h, dk)))
    h0 = jax.random.normal(ks[6], (bsz, h, dk, dv))
    return tuple(x.astype(dtype) for x in (r, w, k, v, -kk, kk * iclr)), h0


def _loss_grads(form, scale=0.7):
    """jit of (o, state, grads wrt r, w, k, v, a, b, h0) of a fixed random linear loss."""

    def loss(r, w, k, v, a, b, h0, reset, wo, ws):
        o, s = form(r, w, k, v, a, b, h0=h0, reset=reset, scale=scale)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws), (o, s)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))


ORACLE = _loss_grads(reference.sequential)
KERNEL = _loss_grads(pallas_tpu.delta_rule)


def _run(fn, args, h0, reset, interpret=False):
    bsz, t, h, dk = args[0].shape
    k1, k2 = jax.random.split(jax.random.key(99))
    wo = jax.random.normal(k1, args[3].shape)
    ws = jax.random.normal(k2, (bsz, h, dk, args[3].shape[3]))
    if interpret:
        with interpreting():
            (_, (o, s)), grads = fn(*args, h0, reset, wo, ws)
    else:
        (_, (o, s)), grads = fn(*args, h0, reset, wo, ws)
    return o, s, grads


def assert_close(got, want, rtol, atol, what):
    """Every output finite and within rtol of the oracle's magnitude (max abs) plus atol."""
    names = ("o", "state", "dr", "dw", "dk", "dv", "da", "db", "dh0")
    flat = [got[0], got[1], *got[2]], [want[0], want[1], *want[2]]
    for name, g, w in zip(names, *flat):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), f"{what}: {name} not finite"
        err = np.abs(g - w).max()
        assert err <= rtol * np.abs(w).max() + atol, f"{what}: {name} off by {err}"


@settings(max_examples=5, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    decays=st.sampled_from(["rwkv7", "rwkv7_bound", "strong"]),
    use_h0=st.booleans(),
    reset_rate=st.sampled_from([0.0, 0.15, 0.4]),
)
def test_matches_oracle(seed, decays, use_h0, reset_rate):
    """f32, T = 37 in chunks of 16: o, final state and the gradients wrt r, w, k, v, a, b, h0
    equal the sequential oracle's. Decays RWKV-7's range, every step at its bound (~-9.7 per
    chunk), or uniform in [-30, 0] (~-240 per chunk); resets drawn, plus ones at a chunk start,
    twice in a row and at the last token."""
    low, high = {"rwkv7": (RWKV7_MIN_LOG_DECAY, 0.0),
                 "rwkv7_bound": (RWKV7_MIN_LOG_DECAY, -0.55), "strong": (-30.0, 0.0)}[decays]
    args, h0 = rwkv7_inputs(jax.random.key(seed), SHAPE, low=low, high=high)
    h0 = h0 if use_h0 else jnp.zeros_like(h0)
    rng = np.random.default_rng(seed)
    reset = rng.random(SHAPE[:2]) < reset_rate
    if reset_rate:
        reset[0, [16, 17, 36]] = True
    reset = jnp.asarray(reset)
    want = _run(ORACLE, args, h0, reset)
    got = _run(KERNEL, args, h0, reset, interpret=True)
    assert_close(got, want, 1e-4, 1e-5, f"{decays} h0={use_h0} resets={reset_rate}")


def test_bf16_two_head_groups_no_h0():
    """bf16 inputs, K = V = 64 with 4 heads (two 128-lane head groups), T = 20 (a partial second
    chunk), no h0 and no resets (the None paths): o in bf16 and the gradients in the inputs'
    dtypes, close to the f32 oracle on the same rounded inputs."""
    args, _ = rwkv7_inputs(jax.random.key(3), (1, 20, 4, 64, 64), jnp.bfloat16)

    def loss(form, *xs):
        o, s = form(*xs)
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(64.0))) + jnp.sum(s), (o, s)

    def run(form, xs):
        fn = jax.value_and_grad(lambda *x: loss(form, *x), argnums=tuple(range(6)), has_aux=True)
        (_, (o, s)), grads = jax.jit(fn)(*xs)
        return o, s, grads

    want = run(reference.sequential, [x.astype(jnp.float32) for x in args])
    with interpreting():
        got = run(pallas_tpu.delta_rule, args)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in got[2])
    assert_close(got, want, 2e-2, 1e-3, "bf16")


@pytest.mark.parametrize("t, chunk", [(5, 16), (32, 16), (45, 32)])
def test_forward_short_whole_and_long_chunks(t, chunk):
    """T = 5 (one chunk of T tokens), T = 32 (two whole chunks of 16), T = 45 in chunks of 32:
    forward equal to the sequential oracle and to the chunked form, with h0 and a reset at a
    chunk start."""
    args, h0 = rwkv7_inputs(jax.random.key(t), (2, t, 2, 5, 4))
    reset = jnp.zeros((2, t), bool).at[1, min(16, t - 1)].set(True)
    want = reference.sequential(*args, h0=h0, reset=reset, scale=0.5)
    chunked = reference.chunked(*args, h0=h0, reset=reset, scale=0.5)
    with interpreting():
        got = jax.jit(
            lambda *x: delta_rule(*x, h0=h0, reset=reset, scale=0.5, chunk_size=chunk)
        )(*args)
    for ref in (want, chunked):
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-4)


def test_dispatch_and_errors():
    """Auto picks the kernel in interpret mode (TPU) for T > 1 and takes the state-step kernel for
    T = 1; off TPU it passes the kernel over for the chunked form. Bad shapes and chunk sizes
    raise ValueError."""
    args, _ = rwkv7_inputs(jax.random.key(0), (1, 9, 1, 4, 4))
    kw = dict(h0=None, reset=None, scale=1.0, chunk_size=None)
    with interpreting():
        assert OP.select("auto", *args, **kw).name == "pallas_tpu"
        assert OP.select("auto", *[x[:, :1] for x in args], **kw).name == "pallas_tpu_decode"
        assert OP.explain(*[x[:, :1] for x in args], **kw)[0] == (
            "pallas_tpu", "auto skips it: T = 1 (the decode step)"
        )
        assert pallas_tpu.supports(*args, **kw | {"chunk_size": 64}) == (
            "chunk_size = 64 is not 16 or 32 (a multiple of 16, <= 32)"
        )
    assert OP.select("auto", *args, **kw).name == "chunked"
    assert OP.explain(*args, **kw)[0][1] == "a TPU kernel (the program runs on cpu)"
    with pytest.raises(ValueError, match=r"w shape \(1, 9, 1, 3\), want \(1, 9, 1, 4\)"):
        pallas_tpu.delta_rule(args[0], args[1][..., :3], *args[2:])
    with pytest.raises(ValueError, match="chunk_size = 24 is not 16 or 32"):
        pallas_tpu.delta_rule(*args, chunk_size=24)


# -- TPU compiles (libtpu on any host) ----------------------------------------------------------
def _compile(mesh, t, *, h=4, dk=64, grad=True, dtype=jnp.bfloat16):
    """jit of the kernel (value and gradients of o and the final state, or the forward alone)
    with batch over data and heads over tensor; inputs arrive as [B, T, H * K] reshaped to
    heads, as the model's projections make them."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tessera.sharding.context import use_mesh

    b = mesh.shape["data"]

    def fwd(r, w, k, v, a, bb, h0, reset):
        xs = [x.reshape(b, t, h, dk) for x in (r, w, k, v, a, bb)]
        return pallas_tpu.delta_rule(*xs, h0=h0, reset=reset, scale=0.5)

    def loss(*xs):
        o, s = fwd(*xs)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    def arg(shape, dt, *spec):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P(*spec)))

    args = ((arg((b, t, h * dk), dtype, "data", None, "tensor"),) * 6
            + (arg((b, h, dk, dk), jnp.float32, "data", "tensor"), arg((b, t), jnp.bool_, "data")))
    fn = jax.value_and_grad(loss, argnums=tuple(range(7))) if grad else fwd
    with use_mesh(mesh):
        return jax.jit(fn).trace(*args).lower().compile()


@needs_libtpu
@pytest.mark.parametrize("topology, dtype", [("v5e-4", jnp.bfloat16), ("v5p-8", jnp.float32),
                                             ("v6e-8", jnp.bfloat16)])
def test_compiles_under_shard_map(topology, dtype):
    """Forward + backward (gradients wrt every input and h0), batch over data and heads over
    tensor, T = 100 (a partial last chunk): both Mosaic kernels are in the program."""
    text = _compile(data_tensor_mesh(topology), 100, dtype=dtype).as_text()
    assert "tessera_delta_rule_fwd" in text and "tessera_delta_rule_bwd" in text


@needs_libtpu
def test_temp_memory_does_not_grow_with_length():
    """v5e-4, 16 heads of 64 (8 per chip): the forward's temp HBM is the same at T = 512 and
    2048 (only per-chunk VMEM blocks: no [T, L, ...] decay tensors, no padded copies); forward +
    backward grows by at most the saved incoming chunk states, K V / 16 float32 per token and
    head."""
    mesh = data_tensor_mesh("v5e-4")
    temp = {(t, grad): _compile(mesh, t, h=16, grad=grad).memory_analysis().temp_size_in_bytes
            for t in (512, 2048) for grad in (False, True)}
    assert temp[512, False] == temp[2048, False]
    per_chip_heads, rows = 16 // mesh.shape["tensor"], 1
    saved = rows * per_chip_heads * (2048 - 512) // 16 * 64 * 64 * 4
    assert temp[2048, True] - temp[512, True] <= saved
