"""GPU attention impls on CPU: pallas_gpu in Pallas interpret mode against the reference (values
and gradients, a small property sweep); cudnn's support checks and its argument translation,
run through jax.nn.dot_product_attention's XLA implementation (cuDNN itself needs a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tessera.kernels.attention as attn
from tessera.kernels.attention import gpu, reference
from tessera.kernels.platform import interpreting
from tessera.kernels.registry import KernelUnavailableError


def inputs(seed, b, t, hq, hkv, d, dtype=jnp.float32, s=None):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, n, h, d)) for n, h in ((t, hq), (s or t, hkv), (s or t, hkv)))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def packed(b, t, lengths):
    """Segment ids and per-segment positions (0, 1, ...) of `lengths` packed in rows of t;
    the rest of a row is padding (segment 0, position 0)."""
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    start = 0
    for i, n in enumerate(lengths):
        seg[:, start:start + n], pos[:, start:start + n] = i + 1, np.arange(n)
        start += n
    return jnp.asarray(seg), jnp.asarray(pos)


def kwargs_for(b, t, causal, lengths):
    if lengths is None:
        pos = jnp.tile(jnp.arange(t, dtype=jnp.int32)[None], (b, 1))
        seg = None
    else:
        seg, pos = packed(b, t, lengths)
    return dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                causal=causal)


def value_and_grads(fn, q, k, v, cot):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cot.astype(out.dtype)))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    t=st.sampled_from([8, 13, 32]),
    heads=st.sampled_from([(2, 2), (2, 1), (4, 2)]),
    d=st.sampled_from([16, 24]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    causal=st.booleans(),
    lengths=st.sampled_from([None, (5, 3), (2, 4, 1)]),
)
def test_pallas_gpu_matches_reference(t, heads, d, dtype, causal, lengths):
    """Forward and gradients against the reference: GQA (K / V repeated), odd head dims (the
    kernel pads them), lengths padded to the blocks, packed segments with a padding tail."""
    if lengths is not None and sum(lengths) > t:
        lengths = (t // 2,)
    b, (hq, hkv) = 2, heads
    q, k, v = inputs(t + d, b, t, hq, hkv, d, jnp.dtype(dtype))
    cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    kw = kwargs_for(b, t, causal, lengths)

    with interpreting("gpu"):
        got = value_and_grads(
            lambda q, k, v: attn.attention(q, k, v, **kw, index_aligned=True, impl="pallas_gpu"),
            q, k, v, cot)
    want = value_and_grads(lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v, cot)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == "float32" else dict(atol=3e-2, rtol=3e-2)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   err_msg=name, **tol)


def test_pallas_gpu_declines_what_it_cannot_express():
    q, k, v = inputs(0, 1, 8, 2, 2, 16)
    kw = kwargs_for(1, 8, True, None)
    assert gpu.pallas_supports(q, k, v, **kw, index_aligned=True) == (
        "a GPU kernel (the program runs on cpu)")
    with interpreting("gpu"):
        assert gpu.pallas_supports(q, k, v, **kw, index_aligned=True) is None
        reasons = {
            "index": gpu.pallas_supports(q, k, v, **kw),
            "window": gpu.pallas_supports(q, k, v, **kw, index_aligned=True, sliding_window=4),
            "kv_valid": gpu.pallas_supports(q, k, v, **kw, index_aligned=True,
                                            kv_valid=jnp.ones((1, 8), bool)),
            "soft cap": gpu.pallas_supports(q, k, v, **kw, index_aligned=True,
                                            logit_soft_cap=5.0),
            "head dim 8": gpu.pallas_supports(*inputs(0, 1, 8, 2, 2, 8), **kw,
                                              index_aligned=True),
            "T = 4 != S = 8": gpu.pallas_supports(q[:, :4], k, v, causal=False),
        }
        for want, reason in reasons.items():
            assert reason is not None and want in reason, (want, reason)
        with pytest.raises(KernelUnavailableError, match="sliding_window"):
            attn.attention(q, k, v, **kw, index_aligned=True, sliding_window=4,
                           impl="pallas_gpu")


def test_padded_length_fits_every_block():
    assert [gpu.padded_length(t) for t in (1, 32, 33, 100, 128, 129, 1000)] == [
        32, 32, 64, 128, 128, 256, 1024]


def test_cudnn_needs_a_gpu_even_in_interpret_mode():
    q, k, v = inputs(0, 1, 8, 2, 2, 16, jnp.bfloat16)
    kw = kwargs_for(1, 8, True, None)
    with interpreting("gpu"):
        assert gpu.cudnn_supports(q, k, v, **kw, index_aligned=True) == (
            "cuDNN needs a CUDA GPU (the program runs on cpu)")
        with pytest.raises(KernelUnavailableError, match="cuDNN needs a CUDA GPU"):
            attn.attention(q, k, v, **kw, index_aligned=True, impl="cudnn")
    assert gpu.cudnn_max_head_dim() == 128  # no compute capability to read on CPU


def test_cudnn_support_checks_on_a_pretend_gpu(monkeypatch):
    monkeypatch.setattr(gpu, "target_platform", lambda: "gpu")
    q, k, v = inputs(0, 1, 8, 4, 2, 16, jnp.bfloat16)
    kw = kwargs_for(1, 8, True, None)
    seg, pos = packed(1, 8, (5, 3))
    assert gpu.cudnn_supports(q, k, v, **kw, index_aligned=True) is None
    assert gpu.cudnn_supports(q, k, v, **kw, index_aligned=True, sliding_window=3) is None
    assert gpu.cudnn_supports(q[:, :3], k, v, causal=False) is None  # nothing masked
    reasons = {
        "dtype float32": gpu.cudnn_supports(*inputs(0, 1, 8, 2, 2, 16), **kw,
                                            index_aligned=True),
        "head dim 20": gpu.cudnn_supports(*inputs(0, 1, 8, 2, 2, 20, jnp.bfloat16), **kw,
                                          index_aligned=True),
        "head dim 136": gpu.cudnn_supports(*inputs(0, 1, 8, 2, 2, 136, jnp.bfloat16), **kw,
                                           index_aligned=True),
        "segment ids": gpu.cudnn_supports(q, k, v, q_segment_ids=seg, index_aligned=True),
        "bidirectional sliding window": gpu.cudnn_supports(
            q, k, v, causal=False, sliding_window=3, index_aligned=True),
        "index_aligned": gpu.cudnn_supports(q, k, v, **kw),
        "value head dim": gpu.cudnn_supports(q, k, v[..., :8], **kw, index_aligned=True),
    }
    for want, reason in reasons.items():
        assert reason is not None and want in reason, (want, reason)


@pytest.mark.parametrize("case", [
    dict(causal=True), dict(causal=True, sliding_window=3), dict(causal=False),
    dict(causal=False, s=5, scale=0.3),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cudnn_arguments_say_what_the_reference_does(case, dtype):
    """The keywords cudnn passes to jax.nn.dot_product_attention, run by its XLA implementation
    (same masking semantics as cuDNN's), give the reference's result."""
    t = 9
    s = case.get("s", t)
    q, k, v = inputs(3, 2, t, 4, 2, 16, dtype, s=s)
    window, scale = case.get("sliding_window"), case.get("scale")
    kw = dict(kwargs_for(2, t, case["causal"], None), kv_positions=jnp.tile(
        jnp.arange(s, dtype=jnp.int32)[None], (2, 1)))
    want = reference.attention(q, k, v, **kw, sliding_window=window, scale=scale)
    args = gpu.cudnn_arguments(q, causal=case["causal"], sliding_window=window, scale=scale)
    got = jax.nn.dot_product_attention(q, k, v, implementation="xla", **args)
    tol = 2e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)


def test_auto_picks_pallas_gpu_but_not_for_full_precision_float32():
    """conftest asks for 'highest' matmul precision: f32 stays on the XLA paths under auto."""
    kw = kwargs_for(1, 8, True, None)
    with interpreting("gpu"):
        f32, bf16 = inputs(0, 1, 8, 2, 2, 16), inputs(0, 1, 8, 2, 2, 16, jnp.bfloat16)
        assert attn.OP.select("auto", *bf16, **kw, index_aligned=True).name == "pallas_gpu"
        explained = dict(attn.OP.explain(*f32, **kw, index_aligned=True))
        assert "the Triton kernel's dots run at TF32" in explained["pallas_gpu"]
        with jax.default_matmul_precision("tensorfloat32"):
            assert attn.OP.select("auto", *f32, **kw, index_aligned=True).name == "pallas_gpu"


def test_pallas_gpu_sharded_matches_unsharded():
    """Under a data x tensor mesh the kernel runs per shard (batch and heads split, GQA groups
    kept together, a shard_map in the program); values and gradients equal the unsharded
    reference's."""
    from jax.sharding import Mesh

    from tessera.sharding import MESH_AXES
    from tessera.sharding.context import use_mesh

    b, t = 2, 16
    q, k, v = inputs(5, b, t, 4, 2, 16)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    kw = kwargs_for(b, t, True, (9, 5))

    def run(q, k, v):
        return value_and_grads(
            lambda q, k, v: attn.attention(q, k, v, **kw, index_aligned=True, impl="pallas_gpu"),
            q, k, v, cot)

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 1, 1, 2), MESH_AXES)
    with interpreting("gpu"), use_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v))
        got = jax.jit(run)(q, k, v)
    want = value_and_grads(lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v, cot)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5,
                                   err_msg=name)
