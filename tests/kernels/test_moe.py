"""The routed-experts op: the ragged dispatch against the dense oracle (forward and gradients),
the registry, slot ranks, and the expert-parallel exchange over meshes against the unsharded
computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.kernels import moe
from tessera.kernels.moe import parallel, reference
from tessera.kernels.registry import KernelUnavailableError
from tessera.layers.routing import capacity_keep
from tessera.sharding import make_mesh, make_rules, use_mesh

N, D, F, E, K = 24, 8, 12, 8, 2


def problem(seed=0, n=N, e=E, k=K, dtype=jnp.float32, drop=3):
    """Random tokens, distinct expert ids per token (the first ``drop`` tokens assigned to no
    expert: id E), weights and expert matrices."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.normal(size=(n, e)), axis=-1)[:, :k]
    ids[:drop] = e
    arrays = dict(
        x=rng.normal(size=(n, D)),
        weights=rng.uniform(0.1, 1.0, size=(n, k)),
        wi_gate=0.4 * rng.normal(size=(e, D, F)),
        wi_up=0.4 * rng.normal(size=(e, D, F)),
        wo=0.4 * rng.normal(size=(e, F, D)),
    )
    arrays = {name: jnp.asarray(a, dtype) for name, a in arrays.items()}
    return jnp.asarray(ids, jnp.int32), arrays


def numpy_experts(ids, x, weights, wi_gate, wi_up, wo):
    """The contract, one assignment at a time."""
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    wg, wu, wo = (np.asarray(w, np.float64) for w in (wi_gate, wi_up, wo))
    out = np.zeros_like(x)
    for n, row in enumerate(np.asarray(ids)):
        for k, e in enumerate(row):
            if e < wg.shape[0]:
                gate = x[n] @ wg[e]
                h = gate / (1 + np.exp(-gate)) * (x[n] @ wu[e])
                out[n] += weights[n, k] * (h @ wo[e])
    return out


NAMES = ("x", "weights", "wi_gate", "wi_up", "wo")


def value_and_grads(ids, arrays, impl):
    def loss(*args):
        y = moe.experts(args[0], ids, *args[1:], impl=impl)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True))(
        *(arrays[n] for n in NAMES)
    )
    return y, dict(zip(NAMES, grads))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ragged_matches_dense_and_numpy(k):
    ids, arrays = problem(seed=k, k=k)
    want = numpy_experts(ids, *(arrays[n] for n in NAMES))
    y_dense, g_dense = value_and_grads(ids, arrays, "dense")
    y_ragged, g_ragged = value_and_grads(ids, arrays, "ragged")
    np.testing.assert_allclose(y_dense, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_ragged, want, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(y_ragged)[:3])  # no expert: zero
    for name in NAMES:
        np.testing.assert_allclose(g_ragged[name], g_dense[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    # Every expert matrix gets a gradient from the tokens routed to it.
    assert np.all(np.abs(np.asarray(g_ragged["wo"])).sum(axis=(1, 2)) > 0)


def test_ragged_bf16_is_close_to_float32():
    ids, arrays = problem(seed=5)
    want = moe.experts(*(arrays[n] for n in NAMES[:1]), ids,
                       *(arrays[n] for n in NAMES[1:]), impl="dense")
    low = {n: a.astype(jnp.bfloat16) for n, a in arrays.items()}
    got = moe.experts(low["x"], ids, *(low[n] for n in NAMES[1:]), impl="ragged")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=0.05)


def test_registry_auto_picks_ragged():
    ids, arrays = problem()
    args = (arrays["x"], ids, *(arrays[n] for n in NAMES[1:]))
    assert moe.OP.select("auto", *args).name == "ragged"
    assert moe.OP.explain(*args) == [
        ("megablox", "a TPU kernel (the program runs on cpu)"),
        ("ragged", None),
        ("dense", "auto skips it: only when named"),
    ]
    assert moe.IMPLS == ("auto", "megablox", "ragged", "dense")
    with pytest.raises(KernelUnavailableError, match="a TPU kernel"):
        moe.experts(*args, impl="megablox")
    with pytest.raises(ValueError, match="unknown moe impl 'pallas'"):
        moe.experts(*args, impl="pallas")
    assert issubclass(KernelUnavailableError, ValueError)


def kernel_problem(seed: int, n: int, d: int, f: int, e: int = 4, k: int = 2, no_expert: int = 0):
    """n tokens of width d routed to k of e experts of width f (the first ``no_expert`` tokens
    to none), float32 arrays at unit scale."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.normal(size=(n, e)), axis=-1)[:, :k]
    ids[:no_expert] = e
    arrays = dict(
        x=rng.normal(size=(n, d)), weights=rng.uniform(0.1, 1.0, size=(n, k)),
        wi_gate=rng.normal(size=(e, d, f)) / np.sqrt(d),
        wi_up=rng.normal(size=(e, d, f)) / np.sqrt(d),
        wo=rng.normal(size=(e, f, d)) / np.sqrt(f),
    )
    return (jnp.asarray(ids, jnp.int32),
            {name: jnp.asarray(a, jnp.float32) for name, a in arrays.items()})


@pytest.mark.parametrize("n, d, f, tiles", [(40, 128, 128, (128, 128, 128)),
                                            (300, 256, 1024, (512, 256, 512))])
def test_megablox_matches_dense_in_interpret_mode(pallas_interpret, n, d, f, tiles):
    """jax's Pallas TPU grouped matmul (interpret mode on CPU) in the ragged dispatch: forward
    and gradients equal the dense oracle, no-expert rows included (their gradient is zero, not
    the kernel's unspecified values). Smallest tiles (40 tokens x 2 pad to one row tile), and
    several row and width tiles (600 assignments pad to 1,024 rows)."""
    from tessera.kernels.moe import megablox

    padded = -(-2 * n // tiles[0]) * tiles[0]
    assert megablox.tiling(padded, d, f) == tiles
    assert megablox.tiling(4096, 2048, 768) == (512, 512, 384)  # Qwen3-30B-A3B's experts
    ids, arrays = kernel_problem(7, n, d, f, no_expert=3)
    args = (arrays["x"], ids, *(arrays[name] for name in NAMES[1:]))
    assert moe.OP.select("auto", *args).name == "megablox"  # auto's pick on TPU
    y_dense, g_dense = value_and_grads(ids, arrays, "dense")
    y_mb, g_mb = value_and_grads(ids, arrays, "megablox")
    np.testing.assert_allclose(y_mb, y_dense, rtol=1e-4, atol=1e-4)
    assert not np.any(np.asarray(y_mb)[:3])
    for name in NAMES:
        np.testing.assert_allclose(g_mb[name], g_dense[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert np.all(np.isfinite(np.asarray(g_mb["x"])))


def test_megablox_bf16_matches_float32_in_interpret_mode(pallas_interpret):
    """bf16 operands (what a TPU run feeds the kernel, at the default precision): forward and
    gradients within bf16 rounding of the float32 dense oracle."""
    ids, exact = kernel_problem(3, 64, 128, 256)
    low = {name: a.astype(jnp.bfloat16) for name, a in exact.items()}
    y_want, g_want = value_and_grads(ids, exact, "dense")
    with jax.default_matmul_precision("default"):
        args = (low["x"], ids, *(low[name] for name in NAMES[1:]))
        assert moe.OP.select("auto", *args).name == "megablox"
        y_mb, g_mb = value_and_grads(ids, low, "megablox")
    assert y_mb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y_mb, np.float32), y_want, rtol=0.05, atol=0.05)
    for name in NAMES:
        got = np.asarray(g_mb[name], np.float32)
        scale = float(np.abs(g_want[name]).max())
        np.testing.assert_allclose(got, g_want[name], rtol=0.05, atol=0.02 * scale, err_msg=name)


def test_rank_in_group_matches_numpy():
    keys = np.random.default_rng(0).integers(0, 4, size=(3, 17))
    order, rank = reference.rank_in_group(jnp.asarray(keys))
    for row, ranks, perm in zip(keys, np.asarray(rank), np.asarray(order)):
        want = [int(np.sum(row[:i] == row[i])) for i in range(len(row))]
        np.testing.assert_array_equal(ranks, want)
        np.testing.assert_array_equal(row[perm], np.sort(row, kind="stable"))


# -- expert parallelism ----------------------------------------------------------------------

B, T = 4, 6


def mesh_of(**axes):
    cfg = load_config("llama:tiny").mesh
    cfg.update(data=1)
    cfg.update(**axes)
    return make_mesh(cfg), make_rules("")


def dispatch_value_and_grads(ids, arrays, mesh=None, rules=None, capacity=0):
    def loss(*args):
        x, w = args[0].reshape(B, T, D), args[1].reshape(B, T, -1)
        if mesh is None:
            y = parallel.dispatch(x, ids.reshape(B, T, -1), w, *args[2:], capacity=capacity)
        else:
            with use_mesh(mesh, rules):
                y = parallel.dispatch(x, ids.reshape(B, T, -1), w, *args[2:], capacity=capacity)
        return jnp.sum(jnp.sin(y)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True))(
        *(arrays[n] for n in NAMES)
    )
    return y.reshape(B * T, D), dict(zip(NAMES, grads))


@pytest.fixture(scope="module")
def unsharded():
    ids, arrays = problem(seed=7, n=B * T)
    return ids, arrays, dispatch_value_and_grads(ids, arrays)


@pytest.mark.parametrize("axes", [
    dict(data=2, expert=4),
    dict(expert=2, tensor=2, fsdp=2),  # expert hidden split over tensor, embed over fsdp
    dict(expert=8),  # 4 rows do not split 8 ways: every expert shard routes the same tokens
    dict(data=8),  # no expert parallelism: each device dispatches its own rows locally
], ids=["data2_expert4", "expert2_tensor2_fsdp2", "expert8", "data8"])
def test_expert_parallel_dispatch_matches_unsharded(axes, unsharded):
    ids, arrays, (want, want_grads) = unsharded
    np.testing.assert_allclose(want, numpy_experts(ids, *(arrays[n] for n in NAMES)),
                               rtol=1e-5, atol=1e-5)
    mesh, rules = mesh_of(**axes)
    got, grads = dispatch_value_and_grads(ids, arrays, mesh, rules)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name in NAMES:
        np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def test_expert_parallel_capacity_buffer_holds_every_kept_assignment():
    """With a capacity of 2 assignments per expert per row the exchange sends blocks of
    min(n * min(K, E/S), E/S * rows * capacity) rows and still equals the unsharded dispatch of
    the kept assignments."""
    ids, arrays = problem(seed=8, n=B * T, drop=0)
    keep = capacity_keep(ids.reshape(B, T, K), jnp.ones((B, T), bool), E, 2)
    kept = jnp.where(keep, ids.reshape(B, T, K), E).reshape(B * T, K)
    assert 0 < int(jnp.sum(~keep)) < B * T * K
    want, want_grads = dispatch_value_and_grads(kept, arrays)
    mesh, rules = mesh_of(data=2, expert=4)
    # 12 tokens and 2 rows per device, 2 experts per shard: min(12 * 2, 2 * 2 * 2) = 8 rows.
    assert parallel.send_rows(12, 2, T, K, 2, 2) == 8
    got, grads = dispatch_value_and_grads(kept, arrays, mesh, rules, capacity=2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name in NAMES:
        np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-5, atol=1e-5)


def test_expert_parallel_needs_whole_experts_per_shard():
    ids, arrays = problem(seed=9, n=B * T, e=6)
    mesh, rules = mesh_of(data=2, expert=4)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the mesh's expert"):
        dispatch_value_and_grads(ids, arrays, mesh, rules)


def test_megablox_declines_bf16_at_highest_precision(pallas_interpret):
    """Mosaic rejects a bf16 dot at HIGHEST precision and megablox's kernel takes the global
    precision: auto passes it over for ragged (and names why) rather than fail to compile."""
    n, d, f, e, k = 8, 128, 128, 2, 1
    x = jnp.zeros((n, d), jnp.bfloat16)
    ids = jnp.zeros((n, k), jnp.int32)
    w = jnp.ones((n, k), jnp.bfloat16)
    wi, wo = jnp.zeros((e, d, f), jnp.bfloat16), jnp.zeros((e, f, d), jnp.bfloat16)
    args = (x, ids, w, wi, wi, wo)
    with jax.default_matmul_precision("highest"):
        assert moe.OP.select("auto", *args).name == "ragged"
        reason = dict(moe.OP.explain(*args))["megablox"]
        assert "bfloat16 operands with jax_default_matmul_precision='highest'" in reason
    with jax.default_matmul_precision("default"):
        assert moe.OP.select("auto", *args).name == "megablox"
