"""Attention kernels: reference vs a naive loop, chunked vs reference (values and gradients, dense
and index-aligned tile schedules), masking edge cases, memory and cost mode of the chunked path,
and the dispatch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tessera.kernels.attention as attn
from tessera.kernels import loops
from tessera.kernels.attention import chunked, reference


def naive_attention(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, causal=True, window=None,
                    kv_valid=None, scale=None, cap=None):
    """Float64 loop over batch, query head and query: the independent oracle."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, t_, hq, d = q.shape
    s_, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = np.zeros((b_, t_, hq, v.shape[-1]))
    for b in range(b_):
        for h in range(hq):
            kh = h // (hq // hkv)
            for t in range(t_):
                keep = np.ones(s_, bool)
                if causal:
                    keep &= kv_pos[b] <= q_pos[b, t]
                if window is not None:
                    keep &= q_pos[b, t] - kv_pos[b] < window
                if q_seg is not None:
                    keep &= (kv_seg[b] == q_seg[b, t]) & (kv_seg[b] != 0)
                if kv_valid is not None:
                    keep &= kv_valid[b]
                if not keep.any():
                    continue
                logits = k[b, keep, kh] @ q[b, t, h] * scale
                if cap is not None:
                    logits = cap * np.tanh(logits / cap)
                w = np.exp(logits - logits.max())
                out[b, t, h] = (w / w.sum()) @ v[b, keep, kh]
    return out


def make_inputs(seed, b, t, s, hq, hkv, d, dv=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, hq, d))
    k = rng.normal(size=(b, s, hkv, d))
    v = rng.normal(size=(b, s, hkv, dv or d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def arange_positions(b, n):
    return jnp.tile(jnp.arange(n, dtype=jnp.int32)[None], (b, 1))


def packed(b, lengths):
    """Segment ids and per-segment positions for sequences of `lengths` packed in a row; the
    remainder of the row (if lengths sum short) is padding, segment 0."""
    seg, pos = [], []
    for i, n in enumerate(lengths):
        seg += [i + 1] * n
        pos += list(range(n))
    return (jnp.tile(jnp.asarray(seg, jnp.int32)[None], (b, 1)),
            jnp.tile(jnp.asarray(pos, jnp.int32)[None], (b, 1)))


def pad_segments(seg, pos, n_pad):
    return (jnp.pad(seg, ((0, 0), (0, n_pad))), jnp.pad(pos, ((0, 0), (0, n_pad))))


CASES = {
    "mha_causal": dict(hq=4, hkv=4),
    "gqa_packed": dict(hq=4, hkv=2, packed=True),
    "mqa_window": dict(hq=4, hkv=1, window=5),
    "gqa_packed_window_noncausal": dict(hq=6, hkv=3, packed=True, window=4, causal=False),
    "value_dim_differs": dict(hq=4, hkv=2, dv=6),
}


def case_kwargs(case, b, t, s=None):
    """Attention kwargs for a case: s keys (default t); the queries are the last t tokens."""
    s = s or t
    seg, pos = None, arange_positions(b, s)
    if case.get("packed"):  # three sequences and 4 padding tokens
        seg, pos = pad_segments(*packed(b, [9, 14, s - 27]), 4)
    kw = dict(q_positions=pos[:, s - t :], kv_positions=pos, causal=case.get("causal", True),
              sliding_window=case.get("window"))
    if seg is not None:
        kw.update(q_segment_ids=seg[:, s - t :], kv_segment_ids=seg)
    return kw


def naive_from_kwargs(q, k, v, kw):
    npy = {name: None if x is None else np.asarray(x) for name, x in kw.items()
           if name not in ("causal", "sliding_window")}
    return naive_attention(
        q, k, v, npy["q_positions"], npy["kv_positions"], npy.get("q_segment_ids"),
        npy.get("kv_segment_ids"), kw["causal"], kw["sliding_window"], npy.get("kv_valid"),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_naive(name):
    case = CASES[name]
    b, t = 2, 31
    q, k, v = make_inputs(0, b, t, t, case["hq"], case["hkv"], 8, case.get("dv"))
    kw = case_kwargs(case, b, t)
    out = reference.attention(q, k, v, **kw)
    assert out.shape == (b, t, case["hq"], case.get("dv") or 8)
    np.testing.assert_allclose(out, naive_from_kwargs(q, k, v, kw), atol=1e-5, rtol=1e-5)


def test_reference_kv_valid_and_custom_scale():
    b, t, s = 2, 5, 12
    q, k, v = make_inputs(1, b, t, s, 4, 2, 8)
    rng = np.random.default_rng(1)
    kv_valid = jnp.asarray(rng.random((b, s)) < 0.7)
    kv_pos = jnp.asarray(rng.permutation(s)[None].repeat(b, 0), jnp.int32)
    q_pos = jnp.asarray([[3, 5, 7, 9, 11]] * b, jnp.int32)
    out = reference.attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos, kv_valid=kv_valid,
                              scale=0.3)
    want = naive_attention(q, k, v, np.asarray(q_pos), np.asarray(kv_pos), kv_valid=kv_valid,
                           scale=0.3)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [reference.attention,
                                  functools.partial(chunked.attention, block_kv=4),
                                  reference.decode_attention],
                         ids=["xla", "xla_chunked", "xla_decode"])
def test_decode_step_matches_full_sequence(impl):
    """One query at position p against a ring-buffer cache (shuffled slots, some empty) equals row
    p of full causal attention over the sequence."""
    b, n, p = 2, 13, 9
    q, k, v = make_inputs(2, b, n, n, 4, 2, 8)
    full = reference.attention(q, k, v, q_positions=arange_positions(b, n),
                               kv_positions=arange_positions(b, n))
    slots = np.random.default_rng(2).permutation(16)[:p + 1]  # cache of 16 slots, p+1 filled
    cache_k = jnp.zeros((b, 16, 2, 8)).at[:, slots].set(k[:, : p + 1])
    cache_v = jnp.zeros((b, 16, 2, 8)).at[:, slots].set(v[:, : p + 1])
    cache_pos = jnp.full((b, 16), -1, jnp.int32).at[:, slots].set(jnp.arange(p + 1))
    out = impl(q[:, p : p + 1], cache_k, cache_v, q_positions=jnp.full((b, 1), p, jnp.int32),
               kv_positions=cache_pos, kv_valid=cache_pos >= 0)
    np.testing.assert_allclose(out[:, 0], full[:, p], atol=1e-5, rtol=1e-5)
    want = naive_attention(q[:, p : p + 1], cache_k, cache_v, np.full((b, 1), p),
                           np.asarray(cache_pos), kv_valid=np.asarray(cache_pos >= 0))
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_form_matches_reference(dtype):
    """xla_decode (products reduced in the cache layout) equals the einsum reference for one
    query token: GQA and MQA (scores as a block-diagonal matmul), six kv heads (scores as
    reduced products), Dv != D, packed segments, a sliding window, a soft cap, a custom
    scale, empty slots, a row that sees nothing (0); auto takes it for T = 1 only."""
    rng = np.random.default_rng(5)
    b, s = 3, 19
    for hq, hkv, d, dv, window, cap, scale in [(4, 2, 8, 8, None, None, None),
                                                (4, 1, 8, 4, 5, 3.0, 0.4),
                                                (12, 6, 4, 4, None, None, None)]:
        q, k, v = make_inputs(int(rng.integers(100)), b, 1, s, hq, hkv, d, dv=dv)
        q, k, v = (x.astype(dtype) for x in (q, k, v))
        kv_pos = jnp.asarray(rng.integers(-1, 15, (b, s)), jnp.int32)
        kw = dict(q_positions=jnp.asarray([[14], [9], [3]], jnp.int32), kv_positions=kv_pos,
                  q_segment_ids=jnp.asarray([[1], [2], [0]], jnp.int32),
                  kv_segment_ids=jnp.asarray(rng.integers(0, 3, (b, s)), jnp.int32),
                  kv_valid=kv_pos >= 0, sliding_window=window, logit_soft_cap=cap, scale=scale)
        got = attn.attention(q, k, v, impl="xla_decode", **kw)
        want = reference.attention(q, k, v, **kw)
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        assert got.dtype == dtype and got.shape == (b, 1, hq, dv)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=tol, rtol=tol)
        assert not np.asarray(got[2], np.float32).any()  # segment 0: sees no key
    picked = [name for name, why in attn.OP.explain(q, k, v, **kw, index_aligned=False,
                                                   block_q=None, block_kv=None) if why is None]
    assert picked[0] == "xla_decode"
    with pytest.raises(ValueError, match="one query token per row"):
        attn.attention(q.repeat(2, 1), k, v, impl="xla_decode",
                       q_positions=jnp.zeros((b, 2), jnp.int32), kv_positions=kv_pos)


def value_and_grads(fn, q, k, v, kw, cotangent):
    def loss(q, k, v):
        out = fn(q, k, v, **kw)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


CHUNKED_CASES = {
    "gqa_packed_window": (dict(hq=4, hkv=2, packed=True, window=6), 37, 37),
    "mqa_noncausal_packed_dv": (dict(hq=4, hkv=1, packed=True, causal=False, dv=4), 37, 37),
    "mha_packed_t_neq_s": (dict(hq=2, hkv=2, packed=True), 21, 45),
}


@pytest.mark.parametrize("name", list(CHUNKED_CASES))
def test_chunked_matches_reference_float32(name):
    case, t, s = CHUNKED_CASES[name]
    b = 2
    q, k, v = make_inputs(3, b, t, s, case["hq"], case["hkv"], 8, case.get("dv"))
    kw = case_kwargs(case, b, t, s)
    ct = jnp.asarray(np.random.default_rng(3).normal(size=(b, t, case["hq"], v.shape[-1])),
                     jnp.float32)
    out_r, grads_r = value_and_grads(reference.attention, q, k, v, kw, ct)
    out_c, grads_c = value_and_grads(
        functools.partial(chunked.attention, block_q=16, block_kv=16), q, k, v, kw, ct)
    np.testing.assert_allclose(out_c, out_r, atol=1e-5, rtol=1e-5)
    for name_, g_c, g_r in zip("qkv", grads_c, grads_r, strict=True):
        np.testing.assert_allclose(g_c, g_r, atol=1e-5, rtol=1e-5, err_msg=f"d{name_}")


@pytest.mark.parametrize("hq, hkv, d, dv, t, s", [(4, 4, 12, 8, 29, 29), (4, 1, 20, 16, 12, 29)],
                         ids=["mla_training_form", "mla_absorbed_form"])
def test_value_dim_and_custom_scale_chunked_matches_reference(hq, hkv, d, dv, t, s):
    """Multi-head latent attention's two calls: per-head keys of Dqk features with values of
    Dv < Dqk, and one shared key / value head (MQA) over a cache-like tail of queries; both with
    a softmax scale that is not 1 / sqrt(Dqk). Reference against the naive loop, chunked against
    the reference, forward and gradients."""
    b, scale = 2, 0.37
    q, k, v = make_inputs(11, b, t, s, hq, hkv, d, dv)
    kw = case_kwargs(dict(packed=True, window=9), b, t, s) | dict(scale=scale)
    ct = jnp.asarray(np.random.default_rng(11).normal(size=(b, t, hq, dv)), jnp.float32)
    out_r, grads_r = value_and_grads(reference.attention, q, k, v, kw, ct)
    npy = {n: np.asarray(x) for n, x in kw.items() if n.endswith(("positions", "segment_ids"))}
    want = naive_attention(q, k, v, npy["q_positions"], npy["kv_positions"],
                           npy["q_segment_ids"], npy["kv_segment_ids"], True, 9, scale=scale)
    assert out_r.shape == (b, t, hq, dv)
    np.testing.assert_allclose(out_r, want, atol=1e-5, rtol=1e-5)
    for impl in (functools.partial(chunked.attention, block_q=8, block_kv=8),
                 functools.partial(attn.attention, impl="xla_chunked", block_q=4, block_kv=16)):
        out_c, grads_c = value_and_grads(impl, q, k, v, kw, ct)
        np.testing.assert_allclose(out_c, out_r, atol=1e-5, rtol=1e-5)
        for name_, g_c, g_r in zip("qkv", grads_c, grads_r, strict=True):
            np.testing.assert_allclose(g_c, g_r, atol=1e-5, rtol=1e-5, err_msg=f"d{name_}")
    # The scale matters: the default one gives another result.
    assert not np.allclose(reference.attention(q, k, v, **(kw | dict(scale=None))), out_r,
                           atol=1e-3)


def test_logit_soft_cap_reference_and_chunked():
    """``logit_soft_cap=c`` (c * tanh(s / c) on the scaled scores): the reference equals the
    naive loop, the chunked path equals the reference in values and gradients (its backward
    carries the tanh's derivative), and the cap changes the result."""
    case = dict(hq=4, hkv=2, packed=True, window=7)
    b, t, cap = 2, 29, 0.8
    q, k, v = make_inputs(13, b, t, t, 4, 2, 8)
    q = q * 3.0  # scores well past the cap
    kw = case_kwargs(case, b, t) | dict(logit_soft_cap=cap)
    ct = jnp.asarray(np.random.default_rng(13).normal(size=(b, t, 4, 8)), jnp.float32)
    out_r, grads_r = value_and_grads(reference.attention, q, k, v, kw, ct)
    npy = {n: np.asarray(x) for n, x in kw.items() if n.endswith(("positions", "segment_ids"))}
    want = naive_attention(q, k, v, npy["q_positions"], npy["kv_positions"],
                           npy["q_segment_ids"], npy["kv_segment_ids"], True, 7, cap=cap)
    np.testing.assert_allclose(out_r, want, atol=1e-5, rtol=1e-5)
    for aligned in (False, True):
        fn = functools.partial(chunked.attention, block_q=8, block_kv=16, index_aligned=aligned)
        out_c, grads_c = value_and_grads(fn, q, k, v, kw, ct)
        np.testing.assert_allclose(out_c, out_r, atol=1e-5, rtol=1e-5)
        for name_, g_c, g_r in zip("qkv", grads_c, grads_r, strict=True):
            np.testing.assert_allclose(g_c, g_r, atol=1e-5, rtol=1e-5, err_msg=f"d{name_}")
    assert not np.allclose(reference.attention(q, k, v, **(kw | dict(logit_soft_cap=None))),
                           out_r, atol=1e-2)
    with pytest.raises(ValueError, match="logit_soft_cap must be > 0"):
        attn.attention(q, k, v, **(kw | dict(logit_soft_cap=0.0)))


def test_chunked_matches_reference_bfloat16():
    case = dict(hq=4, hkv=2, packed=True, window=8)
    b, t = 2, 37
    q, k, v = make_inputs(4, b, t, t, 4, 2, 16, dtype=jnp.bfloat16)
    kw = case_kwargs(case, b, t)
    ct = jnp.asarray(np.random.default_rng(4).normal(size=(b, t, 4, 16)), jnp.float32)
    out_r, grads_r = value_and_grads(reference.attention, q, k, v, kw, ct)
    out_c, grads_c = value_and_grads(
        functools.partial(chunked.attention, block_q=16, block_kv=8), q, k, v, kw, ct)
    assert out_c.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.bfloat16 for g in grads_c)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    np.testing.assert_allclose(f32(out_c), f32(out_r), atol=3e-2, rtol=3e-2)
    for g_c, g_r in zip(grads_c, grads_r, strict=True):
        np.testing.assert_allclose(f32(g_c), f32(g_r), atol=6e-2, rtol=6e-2)


# Index-aligned self attention (query i is key i): every case runs T == S with lengths that are
# not multiples of the blocks, and block_q != block_kv.
ALIGNED_CASES = {
    "mha_causal": (dict(hq=2, hkv=2), 8, 16),
    "gqa_causal": (dict(hq=4, hkv=2), 16, 8),
    "gqa_packed": (dict(hq=4, hkv=2, packed=True), 8, 16),
    "gqa_window": (dict(hq=4, hkv=2, window=9), 8, 4),
    "gqa_packed_window": (dict(hq=4, hkv=2, packed=True, window=6), 16, 8),
    "window_noncausal": (dict(hq=2, hkv=1, window=12, causal=False), 8, 8),
}


@pytest.mark.parametrize("name", list(ALIGNED_CASES))
def test_chunked_index_aligned_matches_reference_float32(name):
    case, bq, bk = ALIGNED_CASES[name]
    b, t = 2, 37
    q, k, v = make_inputs(8, b, t, t, case["hq"], case["hkv"], 8)
    kw = case_kwargs(case, b, t)
    ct = jnp.asarray(np.random.default_rng(8).normal(size=(b, t, case["hq"], 8)), jnp.float32)
    out_r, grads_r = value_and_grads(reference.attention, q, k, v, kw, ct)
    fn = functools.partial(chunked.attention, index_aligned=True, block_q=bq, block_kv=bk)
    out_c, grads_c = value_and_grads(fn, q, k, v, kw, ct)
    np.testing.assert_allclose(out_c, out_r, atol=1e-5, rtol=1e-5)
    for name_, g_c, g_r in zip("qkv", grads_c, grads_r, strict=True):
        np.testing.assert_allclose(g_c, g_r, atol=1e-5, rtol=1e-5, err_msg=f"d{name_}")


def test_chunked_index_aligned_matches_reference_bfloat16():
    case = dict(hq=4, hkv=2, packed=True, window=8)
    b, t = 2, 37
    q, k, v = make_inputs(9, b, t, t, 4, 2, 16, dtype=jnp.bfloat16)
    kw = case_kwargs(case, b, t)
    ct = jnp.asarray(np.random.default_rng(9).normal(size=(b, t, 4, 16)), jnp.float32)
    out_r, grads_r = value_and_grads(reference.attention, q, k, v, kw, ct)
    out_c, grads_c = value_and_grads(
        functools.partial(chunked.attention, index_aligned=True, block_q=8, block_kv=16),
        q, k, v, kw, ct)
    assert out_c.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads_c)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    np.testing.assert_allclose(f32(out_c), f32(out_r), atol=3e-2, rtol=3e-2)
    for g_c, g_r in zip(grads_c, grads_r, strict=True):
        np.testing.assert_allclose(f32(g_c), f32(g_r), atol=6e-2, rtol=6e-2)


def test_index_aligned_is_ignored_when_lengths_differ_and_by_xla():
    """T != S cannot be aligned: the chunked path falls back to every tile; xla takes and ignores
    the flag."""
    case, t, s = CHUNKED_CASES["mha_packed_t_neq_s"]
    q, k, v = make_inputs(10, 2, t, s, 2, 2, 8)
    kw = case_kwargs(case, 2, t, s)
    want = reference.attention(q, k, v, **kw)
    got = chunked.attention(q, k, v, index_aligned=True, block_q=8, block_kv=8, **kw)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(attn.attention(q, k, v, impl="xla", index_aligned=True, **kw), want)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (False, 7), (False, None)])
@pytest.mark.parametrize("t,bq,bk", [(37, 8, 16), (37, 16, 8), (24, 8, 8), (5, 8, 3)])
def test_tile_schedule_holds_exactly_the_tiles_with_a_visible_entry(causal, window, t, bq, bk):
    bq, bk = min(bq, t), min(bk, t)
    mask = np.asarray(reference.make_attention_mask(
        arange_positions(1, t), arange_positions(1, t), causal=causal, sliding_window=window))[0]
    nq, nk = -(-t // bq), -(-t // bk)
    want = tuple((i, j) for i in range(nq) for j in range(nk)
                 if mask[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any())
    kw = dict(causal=causal, sliding_window=window)
    assert chunked.tile_schedule(t, t, bq, bk, index_aligned=True, **kw) == want
    dense = chunked.tile_schedule(t, t, bq, bk, index_aligned=False, **kw)
    assert dense == tuple((i, j) for i in range(nq) for j in range(nk))


def test_chunked_has_no_cond():
    q, k, v = make_inputs(11, 1, 20, 20, 2, 1, 8)
    pos = arange_positions(1, 20)

    def loss(q, k, v, aligned):
        return chunked.attention(q, k, v, q_positions=pos, kv_positions=pos, sliding_window=6,
                                 index_aligned=aligned, block_q=8, block_kv=4).sum()

    for aligned in (True, False):
        jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, aligned=aligned),
                                            (0, 1, 2)))(q, k, v))
        assert "cond[" not in jaxpr and "scan[" in jaxpr


def causal_forward_flops(aligned, t=256, block=64, d=128, heads=2):
    shape = jax.ShapeDtypeStruct((1, t, heads, d), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def fwd(q, k, v, pos):
        return chunked.attention(q, k, v, q_positions=pos, kv_positions=pos, index_aligned=aligned,
                                 block_q=block, block_kv=block)

    return jax.jit(fwd).lower(shape, shape, shape, pos).compile().cost_analysis()["flops"]


def test_cost_mode_counts_every_visited_tile():
    """Inside `loops.unrolled()` XLA counts every tile the schedule visits: 10 of 16 under causal
    masking (4 blocks of 64), each two matmuls of 2 * 64 * 64 * 128 flops per head; outside it
    counts the loop body once."""
    tile = 4 * 64 * 64 * 128 * 2
    with loops.unrolled():
        assert loops.is_unrolled()
        aligned = causal_forward_flops(True)
        dense = causal_forward_flops(False)
    assert not loops.is_unrolled()
    assert 10 * tile <= aligned <= 1.05 * 10 * tile
    assert 16 * tile <= dense <= 1.05 * 16 * tile
    assert causal_forward_flops(True) < 1.1 * tile


def test_unrolled_nests_and_resets_on_error():
    with pytest.raises(RuntimeError), loops.unrolled():
        with loops.unrolled():
            pass
        assert loops.is_unrolled()
        raise RuntimeError
    assert not loops.is_unrolled()


@pytest.mark.parametrize("impl", ["xla", "xla_chunked"])
def test_fully_masked_rows_give_zero_and_finite_grads(impl):
    b, t = 2, 19
    q, k, v = make_inputs(5, b, t, t, 4, 2, 8)
    seg, pos = pad_segments(*packed(b, [7, 6]), t - 13)  # last 6 tokens are padding
    kv_valid = jnp.ones((b, t), bool).at[1].set(False)  # batch row 1 sees no key at all
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
              kv_valid=kv_valid)
    if impl == "xla_chunked":
        kw.update(block_q=8, block_kv=8)
    ct = jnp.ones((b, t, 4, 8), jnp.float32)
    out, (dq, dk, dv) = value_and_grads(functools.partial(attn.attention, impl=impl),
                                        q, k, v, kw, ct)
    assert np.all(np.asarray(out[:, 13:]) == 0)
    assert np.all(np.asarray(out[1]) == 0)
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()
    assert np.all(np.asarray(dq[:, 13:]) == 0) and np.all(np.asarray(dq[1]) == 0)
    assert np.all(np.asarray(dk[:, 13:]) == 0) and np.all(np.asarray(dv[1]) == 0)
    assert np.abs(np.asarray(dq[0, :13])).sum() > 0


def temp_bytes(fn, t):
    """XLA temp buffer bytes of jit(value_and_grad) for B=1, H=1, T=S=t, D=32, float32."""
    qkv = jax.ShapeDtypeStruct((1, t, 1, 32), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(q, k, v, pos):
        return fn(q, k, v, q_positions=pos, kv_positions=pos).sum()

    compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(qkv, qkv, qkv, pos).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_never_builds_the_score_matrix():
    t = 2048
    scores_bytes = t * t * 4
    assert temp_bytes(reference.attention, t) >= scores_bytes
    chunked_fn = functools.partial(chunked.attention, block_q=256, block_kv=256)
    assert temp_bytes(chunked_fn, t) < scores_bytes // 4


def test_scanned_remat_layers_keep_no_stacked_score_tiles_on_tpu(monkeypatch):
    """AOT-compiled for 4 TPU v5p chips: grad of 2 scanned, fully rematerialised layers of chunked
    attention (batch sharded) needs less temp memory than the f32 score tiles of one layer
    stacked (the old `lax.cond` schedule kept 50 MiB here; bound 16 MiB; now about 12 MiB)."""
    pytest.importorskip("libtpu", reason="AOT-compiling for TPU needs libtpu")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    # Another process compiling for TPU holds libtpu's lockfile; a topology needs no chip.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    except Exception as e:  # noqa: BLE001 - any libtpu failure means: cannot measure here
        pytest.skip(f"no TPU topology from libtpu: {e}")
    b, t, h, d, layers, block = 4, 1024, 4, 128, 2, 256
    mesh = Mesh(devices, ("data",))

    def layer(x, w):
        q = jnp.einsum("bthd,hde->bthe", x, w)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (x.shape[0], t))
        return x + chunked.attention(q, x, x, q_positions=pos, kv_positions=pos,
                                     index_aligned=True, block_q=block, block_kv=block)

    def loss(x, ws):
        x, _ = jax.lax.scan(lambda x, w: (jax.checkpoint(layer)(x, w), None), x, ws)
        return x.astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16,
                             sharding=NamedSharding(mesh, PartitionSpec("data")))
    ws = jax.ShapeDtypeStruct((layers, h, d, d), jnp.bfloat16,
                              sharding=NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, ws).compile()
    stacked_tiles = (t // block) ** 2 * (b // len(devices)) * h * block * block * 4
    assert compiled.memory_analysis().temp_size_in_bytes < stacked_tiles


def test_dispatch_errors():
    q, k, v = make_inputs(6, 1, 4, 4, 2, 2, 8)
    kw = dict(q_positions=arange_positions(1, 4), kv_positions=arange_positions(1, 4))
    # Pallas kernels register before these (their tests check their own names).
    assert attn.IMPLS[0] == "auto" and attn.IMPLS[-3:] == ("xla_decode", "xla_chunked", "xla")
    for impl in ("flash", "pallas"):
        with pytest.raises(ValueError, match=f"unknown attention impl '{impl}'; valid: auto, "
                                             ".*xla_decode, xla_chunked, xla$"):
            attn.attention(q, k, v, impl=impl, **kw)
    with pytest.raises(ValueError, match="block_q"):
        attn.attention(q, k, v, impl="xla", block_q=2, **kw)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attn.attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), **kw)
    with pytest.raises(ValueError, match="kv_positions"):
        attn.attention(q, k, v, q_positions=kw["q_positions"], kv_positions=jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="both"):
        attn.attention(q, k, v, q_segment_ids=jnp.ones((1, 4), jnp.int32), **kw)


def test_auto_picks_by_size(monkeypatch):
    q, k, v = make_inputs(7, 1, 8, 8, 2, 1, 8)
    kw = dict(q_positions=arange_positions(1, 8), kv_positions=arange_positions(1, 8))
    calls = []
    real = chunked.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(chunked, "attention", spy)
    want = reference.attention(q, k, v, **kw)
    np.testing.assert_allclose(attn.attention(q, k, v, block_q=4, **kw), want, atol=1e-6)
    assert not calls
    monkeypatch.setattr(attn, "CHUNKED_MIN_SCORES", 64)
    np.testing.assert_allclose(attn.attention(q, k, v, block_q=4, **kw), want, atol=1e-5)
    assert len(calls) == 1 and calls[0]["block_q"] == 4
    assert attn.OP.explain(q, k, v, **kw, block_q=None, block_kv=None)[-2:] == [
        ("xla_chunked", None), ("xla", None)
    ]
