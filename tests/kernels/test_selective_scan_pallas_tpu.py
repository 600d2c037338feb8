"""The Pallas TPU selective scan (`tessera.kernels.selective_scan.pallas_tpu`): forward and
gradients wrt every input equal `reference.sequential` in interpret mode (odd T over several
chunks, Di not a multiple of 128 and over two channel blocks, h0, resets at chunk starts / twice
in a row / on the last token, strong decays, float32 and bfloat16), the dispatch, TPU compiles of
forward + backward under shard_map (v5e, v5p, v6e), and compiled temp memory against T."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.kernels import selective_scan as ss
from tessera.kernels.platform import interpreting
from tessera.kernels.registry import KernelUnavailableError
from tessera.kernels.selective_scan import pallas_tpu, reference
from tests.kernels.tpu import needs_libtpu, tpu_target

# Static shapes per case (each compiles once in interpret mode); hypothesis draws the values,
# the resets, h0 and the decay strength.
#   name: (B, T, Di, N, dtype of x / B / C, dtype of dt, block (bd, L) or None)
CASES = {
    # 3 chunks of 16 (the last one padded), Di = 6 padded to one 128-lane block
    "f32_chunks": (2, 37, 6, 4, jnp.float32, jnp.float32, (128, 16)),
    # bf16 x / dt / B / C; Di = 130: two 128-channel blocks, the second padded; N = 16
    "bf16_two_blocks": (1, 33, 130, 16, jnp.bfloat16, jnp.bfloat16, (128, 16)),
    # the Mamba mixer's dtypes (x, B, C bf16, dt f32), the default table: one chunk (T = 21
    # padded to 32)
    "mixed_default": (2, 21, 40, 16, jnp.bfloat16, jnp.float32, None),
}
NAMES = ("x", "dt", "A", "B", "C", "D", "h0")
F32 = jnp.float32


def _loss(form, wy, wh, x, dt, A, B, C, D, h0, reset):
    y, h = form(x, dt, A, B, C, D, h0=h0, reset=reset)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(h * wh), (y, h)


@functools.cache
def _grad_fns(name):
    """(kernel, oracle): jitted value_and_grad wrt x, dt, A, B, C, D, h0."""
    *_, block = CASES[name]
    kernel = functools.partial(pallas_tpu.selective_scan, block=block)

    def make(form):
        return jax.jit(jax.value_and_grad(functools.partial(_loss, form), argnums=range(2, 9),
                                          has_aux=True))

    return make(kernel), make(reference.sequential)


def _inputs(name, seed, strong, h0_scale, resets):
    b, t, di, n, dtype, dt_dtype, _ = CASES[name]
    rng = np.random.default_rng(seed)
    dt = np.log1p(np.exp(rng.normal(size=(b, t, di)) - 1.0))  # softplus: positive
    log_a = rng.normal(size=(di, n)) * 0.5
    if strong:  # decays down to exp(-200): states vanish within a token
        dt = dt * 20.0
        log_a = log_a + 1.5
    cast = lambda a, d=dtype: jnp.asarray(a, d)  # noqa: E731
    args = [cast(rng.normal(size=(b, t, di))), cast(dt, dt_dtype), cast(-np.exp(log_a), F32),
            cast(rng.normal(size=(b, t, n))), cast(rng.normal(size=(b, t, n))),
            cast(rng.normal(size=(di,)), F32), cast(rng.normal(size=(b, di, n)) * h0_scale, F32)]
    reset = np.zeros((b, t), bool)
    for row, pattern in enumerate(resets[:b]):
        if pattern == "packed":  # a chunk start, twice in a row, the last token
            reset[row, [0, 9, 10, 16, t - 1]] = True
        elif pattern == "random":
            reset[row] = rng.random(t) < 0.15
    weights = (jnp.asarray(rng.normal(size=(b, t, di)), jnp.float32),
               jnp.asarray(rng.normal(size=(b, di, n)), jnp.float32))
    return args, jnp.asarray(reset), weights


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), strong=st.booleans(), h0_scale=st.sampled_from([0.0, 1.0]),
       resets=st.lists(st.sampled_from(["none", "packed", "random"]), min_size=2, max_size=2))
def test_values_and_gradients_match_sequential(name, seed, strong, h0_scale, resets):
    dtype = CASES[name][4]
    args, reset, (wy, wh) = _inputs(name, seed, strong, h0_scale, resets)
    kernel, oracle = _grad_fns(name)
    with interpreting():  # not the fixture: hypothesis runs many inputs in one test call
        (_, (y, h)), grads = kernel(wy, wh, *args, reset)
    (_, (y_ref, h_ref)), grads_ref = oracle(wy, wh, *args, reset)
    assert y.dtype == dtype and h.dtype == jnp.float32
    rel = 1e-4 if dtype == jnp.float32 else 2e-2  # bf16: y and dx / dB / dC are rounded
    pairs = [("y", y, y_ref), ("h", h, h_ref), *zip(NAMES, grads, grads_ref, strict=True)]
    for what, got, want in pairs:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape and np.isfinite(got).all(), what
        scale = max(float(np.max(np.abs(want))), 1e-6)
        np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale, err_msg=f"{name} {what}")


def test_forward_alone_and_padding_steps(pallas_interpret):
    """The forward without a gradient (no chunk states saved) matches, and steps with dt = 0,
    x = 0 (the mixer's padding) leave the state unchanged."""
    args, reset, _ = _inputs("f32_chunks", 5, False, 1.0, ["packed", "random"])
    run = jax.jit(lambda *a: pallas_tpu.selective_scan(*a[:6], h0=a[6], reset=a[7],
                                                       block=(128, 16)))
    y, h = run(*args, reset)
    y_ref, h_ref = reference.sequential(*args[:6], h0=args[6], reset=reset)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    x, dt = (jnp.pad(a, ((0, 0), (0, 11), (0, 0))) for a in args[:2])
    bc = [jnp.pad(a, ((0, 0), (0, 11), (0, 0))) for a in args[3:5]]
    y_pad, h_pad = run(x, dt, args[2], *bc, args[5], args[6], jnp.pad(reset, ((0, 0), (0, 11))))
    np.testing.assert_allclose(h_pad, h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_pad[:, :37], y, rtol=1e-5, atol=1e-5)


def test_dispatch():
    """Auto takes the kernel on TPU (here: interpret mode) for T > 1, the sequential form for
    T = 1 (decode), and the chunked form for T > 1 off TPU."""
    def args(t, dtype=jnp.float32):
        return (jnp.ones((1, t, 8), dtype), jnp.ones((1, t, 8), dtype), -jnp.ones((8, 4)),
                jnp.ones((1, t, 4)), jnp.ones((1, t, 4)), jnp.ones((8,)))

    def why(*a):
        return dict(ss.OP.explain(*a, chunk_size=64))["pallas_tpu"]

    assert why(*args(9)) == "a TPU kernel (the program runs on cpu)"
    assert ss.OP.select("auto", *args(9), chunk_size=64).name == "chunked"
    assert ss.OP.select("auto", *args(1), chunk_size=64).name == "sequential"
    with interpreting():
        assert why(*args(9)) is None
        assert ss.OP.select("auto", *args(9), chunk_size=64).name == "pallas_tpu"
        assert ss.OP.select("auto", *args(1), chunk_size=64).name == "sequential"
        assert why(*args(1)) == "auto skips it: T = 1: a decode step (the sequential form)"
        assert why(*args(9, jnp.float16)) == "x is float16, not float32 or bfloat16"
        y, _ = jax.jit(functools.partial(ss.selective_scan, impl="pallas_tpu"))(*args(9))
    want, _ = reference.sequential(*args(9))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(KernelUnavailableError, match="cannot run these inputs: a TPU kernel"):
        ss.selective_scan(*args(9), impl="pallas_tpu")
    with pytest.raises(ValueError, match="h0 must have shape"):  # called directly: checked too
        pallas_tpu.selective_scan(*args(9), h0=jnp.zeros((1, 4, 8)))


# -- TPU compiles (libtpu on any host) ----------------------------------------------------------
def _compile(topology, mesh_shape, b, t, di, n=16, grad=True):
    """The kernel on ``topology`` (auto picking it) with x bf16, dt f32, batch split over data /
    fsdp and channels over tensor, compiled: with ``grad`` the forward and its VJP for given
    cotangents (y, h and every gradient are outputs), else the forward alone."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tessera.sharding.context import use_mesh
    from tessera.sharding.mesh import MESH_AXES

    devices = tpu_target(topology).devices
    sizes = [mesh_shape.get(a, 1) for a in MESH_AXES]
    mesh = Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
    batch = ("data", "fsdp", "expert")

    def arg(shape, dtype, *spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))

    tokens = (batch, None, "tensor")
    args = (arg((b, t, di), jnp.bfloat16, *tokens), arg((b, t, di), jnp.float32, *tokens),
            arg((di, n), jnp.float32, "tensor"), arg((b, t, n), jnp.bfloat16, batch),
            arg((b, t, n), jnp.bfloat16, batch), arg((di,), jnp.float32, "tensor"),
            arg((b, di, n), jnp.float32, batch, "tensor"))
    reset = arg((b, t), jnp.bool_, batch)
    cotangents = (arg((b, t, di), jnp.bfloat16, *tokens),
                  arg((b, di, n), jnp.float32, batch, "tensor"))

    def scan(x, dt, A, B, C, D, h0, reset):
        return ss.selective_scan(x, dt, A, B, C, D, h0=h0, reset=reset)

    def forward_and_vjp(args, reset, cotangents):
        out, vjp = jax.vjp(lambda *a: scan(*a, reset), *args)
        return out, vjp(cotangents)

    with use_mesh(mesh):
        if grad:
            return jax.jit(forward_and_vjp).trace(args, reset, cotangents).lower().compile()
        return jax.jit(scan).trace(*args, reset).lower().compile()


@needs_libtpu
@pytest.mark.parametrize(
    "topology, mesh_shape, t, di",
    [
        ("v5e-4", {"data": 2, "tensor": 2}, 300, 512),  # odd T: a padded last chunk
        ("v5p-8", {"fsdp": 2, "tensor": 2}, 256, 640),  # Di 320 per chip: 128-lane blocks
        ("v6e-8", {"data": 4, "tensor": 2}, 1000, 1024),
    ],
)
def test_kernel_compiles_under_shard_map(topology, mesh_shape, t, di):
    """Forward and backward compile to the two Mosaic calls, auto picking the kernel."""
    b = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    hlo = _compile(topology, mesh_shape, b, t, di).as_text()
    assert "tessera_selective_scan_fwd" in hlo and "tessera_selective_scan_bwd" in hlo


@needs_libtpu
def test_temp_memory_does_not_grow_with_length():
    """One v5p chip's program (2 rows, Di = 1024) at T = 1024 and 8192, every array it returns
    an output: the kernel's own temp memory (VMEM blocks) does not depend on T. What grows, per
    token and row, is the re-laid-out B / C / keep block W (4 R bytes, R = 40) in the forward
    and, with the backward, the saved chunk states (4 N Di / L), the per-channel-block dB / dC
    partials and their sum (8 N (Di / bd + 1)) and the cotangent's padded copy: far below the
    4 N Di bytes of one state per token that an unchunked backward would keep."""
    b, di, n, r, length, bd = 2, 1024, 16, 40, 128, 512
    mesh = {"data": 4}

    def growth(grad):
        temps = [_compile("v5p-8", mesh, 4 * b, t, di, grad=grad).memory_analysis()
                 .temp_size_in_bytes for t in (1024, 8192)]
        return (temps[1] - temps[0]) / (8192 - 1024) / b

    assert growth(False) <= 4 * r
    bound = 4 * r + 4 * n * di / length + 8 * n * (di // bd + 1)
    assert growth(True) <= bound < 4 * n * di


@pytest.mark.slow
def test_mamba_layer_trains_through_the_kernel(monkeypatch):
    """A small Mamba LM (packed documents: segment ids, positions restarting) with impl=auto
    takes the kernel in interpret mode, forward and backward; its logits and parameter
    gradients equal the chunked XLA form's."""
    from tessera.configs import load_config
    from tessera.models.create import ModelSpec
    from tessera.serve.engine import single_device_mesh
    from tessera.sharding import make_rules

    calls = []
    for name in ("_forward", "_backward"):
        original = getattr(pallas_tpu, name)
        monkeypatch.setattr(pallas_tpu, name, functools.partial(
            lambda f, name, *a, **k: calls.append(name) or f(*a, **k), original, name))
    cfg = load_config("mamba:tiny,model.dtype=float32").model
    cfg.update(d_model=32, vocab_size=61, num_layers=1, init_std=0.2)
    cfg.ssm.update(state_dim=8)
    spec = ModelSpec(cfg)
    params = spec.init(0, single_device_mesh(), make_rules())
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 61, (2, 20)), jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 13, [1] * 17 + [0] * 3], jnp.int32)  # packed; padded
    positions = jnp.asarray([list(range(7)) + list(range(13)), list(range(20))], jnp.int32)

    def loss(params):
        logits = spec.merge(params)(tokens, positions=positions, segment_ids=segments).logits
        return jnp.sum(jnp.where(segments[..., None] > 0, logits, 0) ** 2), logits

    def value_and_grad():  # a new jit each time: interpret mode is read at trace time
        return jax.jit(jax.value_and_grad(lambda p: loss(p), has_aux=True))

    (_, logits), grads = value_and_grad()(params)
    assert not calls
    with interpreting():
        (_, logits_k), grads_k = value_and_grad()(params)
    assert set(calls) == {"_forward", "_backward"}  # the forward twice with remat
    np.testing.assert_allclose(logits_k, logits, rtol=1e-4, atol=1e-4)
    for path, g, g_k in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                            jax.tree.leaves(grads_k), strict=True):
        scale = float(np.max(np.abs(g))) or 1.0
        np.testing.assert_allclose(g_k, g, rtol=1e-4, atol=1e-4 * scale, err_msg=str(path[0]))
