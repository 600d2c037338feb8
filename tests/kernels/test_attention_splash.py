"""The pallas_tpu attention impl (jax's splash kernel, `tessera.kernels.attention.splash`):
parity with `reference.attention` (values and dq, dk, dv) in Pallas interpret mode on CPU, its
support reasons, and AOT compiles for TPU topologies (the kernel under shard_map; that auto
picks it in whole train steps is asserted by tests/aot's tiny train-step compiles)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tessera.kernels.attention as attn
from tessera.kernels.attention import reference, splash
from tessera.kernels.platform import interpreting
from tessera.kernels.registry import KernelUnavailableError

# 128-wide tiles on CPU, so that lengths up to 300 span several blocks and the block-sparse
# schedules (causal and window skipping, shrunk grids) run, not one tile.
SMALL = splash.Blocks(q=128, kv=128, kv_compute=128, q_bwd=128, kv_bwd=128)


def _inputs(seed, b, t, hq, hkv, d, dv, dtype):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.normal(size=shape), dtype)
        for shape in ((b, t, hq, d), (b, t, hkv, d), (b, t, hkv, dv))
    )


def _packed(b, t, seed):
    """Segment ids of 1-3 documents per row with a padding tail (0), and their positions."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=2, replace=False))
        end = t - int(rng.integers(0, 5))
        bounds = [0, *cuts, end]
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[row, lo:hi] = i + 1
            pos[row, lo:hi] = np.arange(hi - lo)
    return jnp.asarray(seg), jnp.asarray(pos)


def _value_and_grads(impl, q, k, v, kw):
    def loss(q, k, v):
        out = attn.attention(q, k, v, impl=impl, index_aligned=True, **kw)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    t=st.integers(1, 300),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    dims=st.sampled_from([(64, 64), (96, 96), (64, 32)]),
    causal=st.booleans(),
    segments=st.booleans(),
    window=st.sampled_from([None, 1, 40, 200]),
    cap=st.sampled_from([None, 5.0]),
    scale=st.sampled_from([None, 0.3]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_matches_reference_values_and_grads(b, t, hkv, group, dims, causal, segments, window,
                                            cap, scale, dtype):
    d, dv = dims
    q, k, v = _inputs(t, b, t, hkv * group, hkv, d, dv, dtype)
    if segments:
        seg, pos = _packed(b, t, t)
    else:
        seg, pos = None, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
              causal=causal, sliding_window=window, logit_soft_cap=cap, scale=scale)
    old = splash.BLOCKS["default"]
    splash.BLOCKS["default"] = SMALL
    try:
        with interpreting():
            got, got_grads = _value_and_grads("pallas_tpu", q, k, v, kw)
    finally:
        splash.BLOCKS["default"] = old
    want, want_grads = _value_and_grads("xla", q, k, v, kw)
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)
    for name, g, w in zip("qkv", got_grads, want_grads):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale_ = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, atol=tol * scale_ * 2, rtol=tol, err_msg=f"d{name}")


def _kw(b, t, **extra):
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return dict(q_positions=pos, kv_positions=pos, **extra)


def test_support_reasons(pallas_interpret):
    q, k, v = _inputs(0, 1, 16, 2, 1, 8, 8, jnp.float32)
    ok = _kw(1, 16, index_aligned=True)
    assert splash.supports(q, k, v, **ok) is None
    assert "index_aligned=True" in splash.supports(q, k, v, **_kw(1, 16))
    assert "kv_valid" in splash.supports(
        q, k, v, **ok | {"kv_valid": jnp.ones((1, 16), bool)}
    )
    assert "T = 4 != S = 16" in splash.supports(q[:, :4], k, v, **ok)
    assert "float32 or bfloat16" in splash.supports(q.astype(jnp.float16), k, v, **ok)
    # auto passes it over for a cached call and says why
    assert attn.OP.explain(q, k, v, **_kw(1, 16), block_q=None, block_kv=None)[0] == (
        "pallas_tpu", "splash masks by index: needs index_aligned=True (self attention, no cache)"
    )


def test_named_on_cpu_raises():
    q, k, v = _inputs(0, 1, 16, 2, 1, 8, 8, jnp.float32)
    assert splash.supports(q, k, v, **_kw(1, 16, index_aligned=True)) == (
        "a TPU kernel (the program runs on cpu)"
    )
    with pytest.raises(KernelUnavailableError, match="'pallas_tpu' cannot run these inputs: a TPU"):
        attn.attention(q, k, v, impl="pallas_tpu", **_kw(1, 16, index_aligned=True))
    # auto falls through to the XLA paths on CPU
    out = attn.attention(q, k, v, **_kw(1, 16, index_aligned=True))
    np.testing.assert_allclose(out, reference.attention(q, k, v, **_kw(1, 16)), atol=1e-6)


def test_blocks_by_generation_and_length():
    assert [splash.generation(k) for k in ("TPU v4", "TPU v5 lite", "TPU v5e", "TPU v5",
                                           "TPU v5p", "TPU v6 lite", "cpu")] == [
        "v4", "v5e", "v5e", "v5p", "v5p", "v6e", "default"]
    bs = splash.block_sizes(splash.BLOCKS["v5p"], 384)  # clipped to a divisor of the length
    assert (bs.block_q, bs.block_kv, bs.block_q_dkv) == (384, 384, 384)
    bs = splash.block_sizes(splash.BLOCKS["v6e"], 8192)
    assert (bs.block_q, bs.block_kv, bs.block_kv_compute) == (512, 1024, 512)
    assert splash.block_sizes(splash.BLOCKS["default"], 640).block_q == 128  # 640 = 5 x 128


# -- AOT compiles for TPU ------------------------------------------------------------------------
def _have_libtpu() -> bool:
    from tessera.aot.topology import have_libtpu

    return have_libtpu()


needs_libtpu = pytest.mark.skipif(
    not _have_libtpu(),
    reason="libtpu is not installed (pip install 'tessera[tpu]', Linux x86-64)",
)


@pytest.fixture(scope="module")
def tpu_env():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _target(name):
    from tessera.aot.compile import make_target
    from tessera.aot.topology import parse_topology

    return make_target(parse_topology(name))


@needs_libtpu
@pytest.mark.parametrize(
    "topology, mesh_shape, hq, hkv, d, dv, t, dtype",
    [
        ("v5e-4", {"data": 2, "tensor": 2}, 4, 2, 128, 128, 256, jnp.bfloat16),
        # MQA, odd length, D 96, float32 at the tests' `highest` matmul precision
        ("v5p-8", {"fsdp": 2, "tensor": 2}, 4, 1, 96, 96, 200, jnp.float32),
        ("v6e-8", {"data": 2, "tensor": 4}, 8, 4, 192, 128, 384, jnp.bfloat16),  # MLA: Dv != D
    ],
)
def test_kernel_compiles_under_shard_map(tpu_env, topology, mesh_shape, hq, hkv, d, dv, t,
                                         dtype):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from tessera.sharding.context import use_mesh
    from tessera.sharding.mesh import MESH_AXES

    devices = _target(topology).devices
    sizes = [mesh_shape.get(a, 1) for a in MESH_AXES]
    mesh = Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
    b = 4

    def loss(q, k, v, seg):
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        out = attn.attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                             kv_segment_ids=seg, sliding_window=128, logit_soft_cap=30.0,
                             index_aligned=True, impl="pallas_tpu")
        return out.astype(jnp.float32).sum()

    batch = ("data", "fsdp", "expert")
    def heads(h):
        split = "tensor" if h % mesh.shape["tensor"] == 0 else None
        return NamedSharding(mesh, PartitionSpec(batch, None, split))

    args = [jax.ShapeDtypeStruct((b, t, h, x), dtype, sharding=heads(h))
            for h, x in ((hq, d), (hkv, d), (hkv, dv))]
    rows = NamedSharding(mesh, PartitionSpec(batch))
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)
    with use_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args, seg)
    hlo = lowered.compile().as_text()
    assert "tpu_custom_call" in hlo and "splash_mha_dkv" in hlo


@needs_libtpu
def test_cost_estimates_can_be_left_off(tpu_env):
    """With its estimates (the default) XLA costs splash's forward at about the causal half of
    T x T; `set_cost_estimates(False)` (``tessera.aot --no-splash_estimates``) leaves the
    kernel uncosted, as XLA does for a Pallas call without one. (jax caches a traced kernel by
    shape, so each setting gets its own length.)"""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from tessera.aot.analysis import cost
    from tessera.sharding.context import use_mesh
    from tessera.sharding.mesh import MESH_AXES

    mesh = Mesh(np.asarray(_target("v5e-1").devices).reshape([1] * len(MESH_AXES)), MESH_AXES)
    sharding = NamedSharding(mesh, PartitionSpec())
    b, h, d = 1, 4, 128

    def flops(t: int, estimates: bool) -> tuple[float, float]:
        def fwd(q, k, v):
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            return attn.attention(q, k, v, q_positions=pos, kv_positions=pos,
                                  index_aligned=True, impl="pallas_tpu")

        args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=sharding)] * 3
        splash.set_cost_estimates(estimates)
        try:
            with use_mesh(mesh):
                got = cost(jax.jit(fwd).lower(*args).compile())["flops"]
        finally:
            splash.set_cost_estimates(True)
        return got, 2 * 2 * b * h * t * t * d / 2  # QK^T and PV over the causal half

    on, half = flops(1280, True)
    assert 0.9 * half <= on <= 2 * half
    off, half = flops(896, False)
    assert off < 0.1 * half
