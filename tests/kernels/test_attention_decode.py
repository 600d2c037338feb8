"""The Pallas TPU decode attention kernel (`tessera.kernels.attention.decode`): parity with
`reference.attention` in interpret mode over ragged cache rows, its block ranges (blocks past a
row's keys are never visited), and TPU compiles (the kernel under shard_map on v5e / v5p / v6e,
the llama:tiny decode program picking it)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tessera.kernels.attention as attn
from tessera.kernels.attention import decode, reference
from tessera.kernels.platform import interpreting
from tests.kernels.tpu import needs_libtpu, tpu_target

BLOCK = 128  # the smallest kv block: several blocks per row at tiny S


def cache_rows(lengths, s):
    """Cache positions [B, S] (-1 empty) and the query positions [B, 1] of rows that have seen
    ``lengths`` tokens (the query's own token included) in a cache of S slots filled in order,
    slot = position % S (a ring once a row is longer than S)."""
    kv_pos = np.full((len(lengths), s), -1, np.int32)
    for row, n in enumerate(lengths):
        for p in range(max(0, n - s), n):
            kv_pos[row, p % s] = p
    q_pos = np.maximum(np.asarray(lengths, np.int32) - 1, 0)[:, None]
    return jnp.asarray(q_pos), jnp.asarray(kv_pos)


# Static shapes and options per case (each compiles once in interpret mode); hypothesis sweeps
# the rows' lengths, padding queries and dropped slots under each.
#   name: (S, Hq, Hkv, D, Dv, dtype, window, soft cap, scale)
CASES = {
    "gqa_f32": (300, 4, 2, 16, 16, jnp.float32, None, None, None),
    "mla_mqa_bf16": (200, 4, 1, 24, 16, jnp.bfloat16, None, None, 0.3),
    "mha_window_cap_f32": (260, 2, 2, 8, 8, jnp.float32, 150, 5.0, None),
    "gqa_window_bf16": (130, 6, 3, 8, 8, jnp.bfloat16, 100, 30.0, None),
}
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
BATCH = 3


@functools.cache
def _kernel_fn(name):
    s, hq, hkv, d, dv, dtype, window, cap, scale = CASES[name]
    kw = dict(sliding_window=window, logit_soft_cap=cap, scale=scale)

    def run(impl, q, k, v, q_pos, kv_pos, q_seg, kv_valid):
        kv_seg = (kv_pos >= 0).astype(jnp.int32)
        return attn.attention(
            q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
            kv_segment_ids=kv_seg, kv_valid=kv_valid, impl=impl, **kw,
            **({"block_kv": BLOCK} if impl == "pallas_tpu_decode" else {}),
        )

    return jax.jit(functools.partial(run, "pallas_tpu_decode")), jax.jit(
        functools.partial(run, "xla")
    )


def _inputs(name, seed):
    s, hq, hkv, d, dv, dtype, *_ = CASES[name]
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=shape) for shape in
               ((BATCH, 1, hq, d), (BATCH, s, hkv, d), (BATCH, s, hkv, dv)))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


lengths_strategy = st.lists(
    st.one_of(st.just(0), st.just(1), st.integers(0, 520)), min_size=BATCH, max_size=BATCH
)


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=5, deadline=None, derandomize=True)
@given(lengths=lengths_strategy, pad_row=st.integers(-1, BATCH - 1), drop=st.booleans(),
       seed=st.integers(0, 3))
def test_matches_reference_on_ragged_rows(name, lengths, pad_row, drop, seed):
    """Rows of any length (empty, one token, partly filled, full, wrapped ring buffer), a padding
    query (segment 0), dropped slots (kv_valid) agree with the reference."""
    s = CASES[name][0]
    lengths = [*lengths[:-1], s]  # one row holds a full cache
    q, k, v = _inputs(name, seed)
    q_pos, kv_pos = cache_rows(lengths, s)
    q_seg = jnp.ones((BATCH, 1), jnp.int32)
    if pad_row >= 0:
        q_seg = q_seg.at[pad_row].set(0)
    kv_valid = None
    if drop:
        kv_valid = jnp.asarray(np.random.default_rng(seed).random((BATCH, s)) > 0.2)
    kernel, xla = _kernel_fn(name)
    with interpreting():  # not the fixture: hypothesis runs many inputs in one test call
        got = kernel(q, k, v, q_pos, kv_pos, q_seg, kv_valid)
    want = xla(q, k, v, q_pos, kv_pos, q_seg, kv_valid)
    assert got.dtype == q.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **TOL[CASES[name][5]])


@functools.cache
def _latent_fns():
    """(kernel, oracle): MLA's absorbed step, latent R = 32 and rope key Dr = 16, 4 heads."""
    from tessera.kernels.attention.latent import latent_attention

    def run(impl, q, latent, k_rope, q_pos, kv_pos, q_seg):
        return latent_attention(
            q, latent, k_rope, impl=impl, q_positions=q_pos, kv_positions=kv_pos,
            q_segment_ids=q_seg, kv_segment_ids=(kv_pos >= 0).astype(jnp.int32), scale=0.2,
        )

    return jax.jit(functools.partial(run, "pallas_tpu_decode")), jax.jit(
        functools.partial(run, "xla")
    )


@settings(max_examples=5, deadline=None, derandomize=True)
@given(lengths=lengths_strategy, seed=st.integers(0, 3))
def test_latent_form_matches_reference(lengths, seed):
    """MLA's absorbed form read apart (latent once, as keys and values; no concat) equals
    attention over the concatenated keys; unfilled slots hold NaN."""
    s = 200
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(BATCH, 1, 4, 48)), jnp.float32)
    latent = jnp.asarray(rng.normal(size=(BATCH, s, 32)), jnp.float32)
    k_rope = jnp.asarray(rng.normal(size=(BATCH, s, 16)), jnp.float32)
    q_pos, kv_pos = cache_rows(lengths, s)
    q_seg = jnp.ones((BATCH, 1), jnp.int32)
    empty = (kv_pos < 0)[:, :, None]
    kernel, xla = _latent_fns()
    with interpreting():
        got = kernel(q, jnp.where(empty, jnp.nan, latent), jnp.where(empty, jnp.nan, k_rope),
                     q_pos, kv_pos, q_seg)
    np.testing.assert_allclose(got, xla(q, latent, k_rope, q_pos, kv_pos, q_seg),
                               **TOL[jnp.float32])


def test_blocks_past_a_row_are_not_visited(pallas_interpret):
    """Each row visits exactly the blocks spanning its visible keys (an unchanged block index
    is not fetched again), and unfilled slots full of NaN leave the output finite and exact."""
    s = 300
    lengths = [0, 1, 129, 300]
    q_pos, kv_pos = cache_rows(lengths, s)
    visible = reference.make_attention_mask(q_pos, kv_pos, kv_valid=kv_pos >= 0)[:, 0]
    padded = jnp.pad(visible, ((0, 0), (0, 3 * BLOCK - s)))
    lo, n = decode.block_range(padded, BLOCK)
    np.testing.assert_array_equal(lo, [0, 0, 0, 0])
    np.testing.assert_array_equal(n, [0, 1, 2, 3])
    visited = [{int(decode.visited_block(t, lo[r], n[r])) for t in range(3)} for r in range(4)]
    assert visited == [{0}, {0}, {0, 1}, {0, 1, 2}]  # an empty row's one fetch, never computed
    # A window hides the start of a long row: its range starts past block 0.
    window = reference.make_attention_mask(q_pos, kv_pos, sliding_window=50)[:, 0]
    lo_w, n_w = decode.block_range(jnp.pad(window, ((0, 0), (0, 3 * BLOCK - s))), BLOCK)
    assert (int(lo_w[3]), int(n_w[3])) == (1, 2)

    q, k, v = _inputs("gqa_f32", 0)
    q_pos, kv_pos = cache_rows([0, 129, 200], s)
    empty = (kv_pos < 0)[:, :, None, None]
    q_seg = jnp.ones((BATCH, 1), jnp.int32)
    kernel, xla = _kernel_fn("gqa_f32")
    got = kernel(q, jnp.where(empty, jnp.nan, k), jnp.where(empty, jnp.nan, v), q_pos, kv_pos,
                 q_seg, None)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, xla(q, k, v, q_pos, kv_pos, q_seg, None), **TOL[jnp.float32])


def test_no_gradient():
    q, k, v = (jnp.ones((1, 1, 2, 8)),) * 3
    kw = dict(q_positions=jnp.zeros((1, 1), jnp.int32), kv_positions=jnp.zeros((1, 1), jnp.int32))
    with interpreting(), pytest.raises(NotImplementedError, match="no gradient"):
        jax.make_jaxpr(jax.grad(lambda q: decode.attention(q, k, v, **kw).sum()))(q)


def test_dispatch():
    """Auto takes it on TPU (here: interpret mode) for one query token over a cache only."""
    q, k, v = (jnp.ones((1, t, 2, 8)) for t in (1, 5, 5))
    kw = dict(q_positions=jnp.zeros((1, 1), jnp.int32), kv_positions=jnp.zeros((1, 5), jnp.int32))
    def why(q, k, v, **kw):
        return dict(attn.OP.explain(q, k, v, **kw))["pallas_tpu_decode"]

    assert why(q, k, v, **kw) == "a TPU kernel (the program runs on cpu)"
    with interpreting():
        assert why(q, k, v, **kw) is None
        assert attn.OP.select("auto", q, k, v, **kw).name == "pallas_tpu_decode"
        assert why(q, k, v, **kw, block_kv=64) == "block_kv = 64 is not a multiple of 128"
        assert why(k, k, v, **kw | {"q_positions": kw["kv_positions"]}) == (
            "decode only: T = 5 > 1"
        )


# -- TPU compiles (libtpu on any host) ----------------------------------------------------------
@needs_libtpu
@pytest.mark.parametrize(
    "topology, hq, hkv, d, dv",
    [
        ("v5e-4", 8, 2, 128, 128),  # GQA, kv heads split over tensor, one head per block
        ("v5p-8", 8, 1, 160, 128),  # MLA's absorbed shape: one shared key head, Dv < D
        ("v6e-8", 8, 4, 64, 64),  # two 64-wide heads per 128-lane block
    ],
)
def test_kernel_compiles_under_shard_map(topology, hq, hkv, d, dv):
    """The kernel, sharded over batch (data) and heads (tensor), compiles to a Mosaic call."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tessera.sharding.context import use_mesh

    devices = np.array(tpu_target(topology).devices)
    mesh = Mesh(devices.reshape(-1, 2), ("data", "tensor"))
    b, s = devices.size, 700  # a partial last kv block

    def step(q, k, v, q_pos, kv_pos):
        return decode.attention(
            q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=jnp.ones_like(q_pos),
            kv_segment_ids=(kv_pos >= 0).astype(jnp.int32), sliding_window=256,
            logit_soft_cap=30.0,
        )

    def arg(shape, dtype, *spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))

    heads = "tensor" if hkv % 2 == 0 else None
    args = (arg((b, 1, hq, d), jnp.bfloat16, "data", None, heads),
            arg((b, s, hkv, d), jnp.bfloat16, "data", None, heads),
            arg((b, s, hkv, dv), jnp.bfloat16, "data", None, heads),
            arg((b, 1), jnp.int32, "data"), arg((b, s), jnp.int32, "data"))
    with use_mesh(mesh):
        compiled = jax.jit(step).trace(*args).lower().compile()
    assert "tpu_custom_call" in compiled.as_text()


@needs_libtpu
@pytest.mark.parametrize(
    "spec, topology, mesh",
    [("llama:tiny", "v5e-4", {"mesh.data": 2, "mesh.fsdp": 2}),
     ("deepseek:tiny", "v5p-8", {"mesh.data": 2, "mesh.tensor": 2})],  # MLA: the latent form
)
def test_decode_program_uses_the_kernel(spec, topology, mesh):
    """impl=auto picks the kernel in the Decoder's decode loop, and the donated cache is still
    updated in place."""
    from tessera.configs import load_config
    from tessera.models.create import ModelSpec
    from tessera.serve.engine import Decoder
    from tessera.sharding import make_mesh

    config = load_config(spec, mesh)
    target = tpu_target(topology)
    mesh = make_mesh(config.mesh, target.devices)
    decoder = Decoder(ModelSpec(config.model), None, mesh, config.mesh.rules)
    compiled = decoder.lower(4, 20, 8)["decode"].compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.memory_analysis().alias_size_in_bytes > 0


# -- the models' decode steps through the kernel (interpret mode) -------------------------------
@pytest.mark.slow
def test_mla_model_decode_steps_through_the_kernel(monkeypatch):
    """deepseek:tiny (MLA's absorbed form: one shared key head, Dv < D): prefill, then one token
    at a time with impl=auto taking the kernel for every decode step; the logits equal one
    uncached forward pass. (GQA rows and ring buffers: the sweep above; the layer change: the
    cached-decode tests of tests/models and tests/layers.)"""
    from tessera.serve.engine import single_device_mesh
    from tessera.sharding import make_rules
    from tests.cached_decode import build_lm, check_cached_decode, random_tokens

    calls = []
    per_shard = decode._per_shard

    def spy(*args, **kwargs):
        calls.append(1)
        return per_shard(*args, **kwargs)

    monkeypatch.setattr(decode, "_per_shard", spy)
    with interpreting():
        cfg, params, apply, model = build_lm(
            "deepseek:tiny,model.dtype=float32,model.init_std=0.1,model.prefix=(),"
            "model.pattern=('mla:mlp',),model.num_layers=1",
            lambda spec, seed: spec.init(seed, single_device_mesh(), make_rules()),
        )
        tokens = random_tokens((2, 8), cfg.vocab_size, seed=3)
        full = apply(params, tokens).logits
        assert not calls  # no cache: the kernel declines
        check_cached_decode(apply, params, tokens, full, model.init_cache(2, 8), (5,),
                            dict(rtol=1e-4, atol=1e-4))
    assert calls
