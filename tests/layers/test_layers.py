"""Building blocks against hand-written numpy: RMSNorm, LayerNorm, the SwiGLU and GELU MLPs,
embedding, LM head and classifier head."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.layers.embeddings import ClassHead, Embed, LMHead
from tessera.layers.mlp import MLP
from tessera.layers.norms import LayerNorm, RMSNorm, make_norm


def np_rmsnorm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(scale)


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def primitives(jaxpr):
    """(primitive name, input dtypes) of every equation, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, [v.aval.dtype for v in eqn.invars if hasattr(v, "aval")]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if hasattr(sub, "eqns"):
                    yield from primitives(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from primitives(sub.jaxpr)


def test_rmsnorm_matches_numpy():
    rng = np.random.default_rng(0)
    norm = RMSNorm(24, eps=1e-5, rngs=nnx.Rngs(0))
    scale = rng.normal(1.0, 0.5, 24).astype(np.float32)
    norm.scale[...] = jnp.asarray(scale)
    x = rng.normal(0.0, 3.0, (2, 5, 24)).astype(np.float32)
    y = norm(jnp.asarray(x))
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, np_rmsnorm(x, scale, 1e-5), rtol=1e-5, atol=1e-6)


def test_rmsnorm_eps_matters_for_small_inputs():
    norm = RMSNorm(8, eps=1e-2, rngs=nnx.Rngs(0))
    x = np.full((1, 8), 0.05, np.float32)
    np.testing.assert_allclose(norm(jnp.asarray(x)), np_rmsnorm(x, np.ones(8), 1e-2), rtol=1e-5)


def test_rmsnorm_bf16_input_uses_float32_statistics():
    rng = np.random.default_rng(1)
    norm = RMSNorm(512, eps=1e-6, rngs=nnx.Rngs(0))
    scale = rng.normal(1.0, 0.2, 512).astype(np.float32)
    norm.scale[...] = jnp.asarray(scale)
    x = jnp.asarray(rng.normal(0.0, 2.0, (3, 512)), jnp.bfloat16)
    y = norm(x)
    assert y.dtype == jnp.bfloat16
    # The float32 result of the bf16 inputs, rounded once to bf16: within one bf16 ulp (2^-8).
    want = np_rmsnorm(np.asarray(x, np.float32), scale, 1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2**-8, atol=1e-6)
    # The mean of squares is reduced in float32, not in the input's bf16.
    reductions = [
        dtypes for name, dtypes in primitives(jax.make_jaxpr(norm)(x).jaxpr) if name == "reduce_sum"
    ]
    assert reductions, "RMSNorm computes no reduce_sum?"
    assert all(d == jnp.float32 for dtypes in reductions for d in dtypes), reductions


def np_layernorm(x, scale, bias, eps):
    x = np.asarray(x, np.float64)
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred**2, axis=-1, keepdims=True) + eps) * scale + bias


def test_layernorm_matches_numpy():
    rng = np.random.default_rng(8)
    norm = LayerNorm(24, eps=1e-12, rngs=nnx.Rngs(0))
    scale, bias = rng.normal(1.0, 0.5, 24), rng.normal(0.0, 0.5, 24)
    norm.scale[...] = jnp.asarray(scale, jnp.float32)
    norm.bias[...] = jnp.asarray(bias, jnp.float32)
    x = rng.normal(3.0, 2.0, (2, 5, 24)).astype(np.float32)  # a mean far from 0
    y = norm(jnp.asarray(x))
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, np_layernorm(x, scale, bias, 1e-12), rtol=1e-5, atol=1e-5)
    # bf16 input: statistics in float32, one rounding to bf16 at the end.
    y16 = norm(jnp.asarray(x, jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    want = np_layernorm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), scale, bias, 1e-12)
    np.testing.assert_allclose(np.asarray(y16, np.float32), want, rtol=2**-7, atol=2e-2)


def test_make_norm_follows_the_config():
    cfg = small_model_cfg()
    assert isinstance(make_norm(cfg, rngs=nnx.Rngs(0)), RMSNorm)
    cfg.update(norm="layernorm", norm_eps=1e-12)
    norm = make_norm(cfg, rngs=nnx.Rngs(0))
    assert isinstance(norm, LayerNorm) and norm.eps == 1e-12 and norm.bias[...].shape == (16,)
    cfg.norm = "batchnorm"
    with pytest.raises(ValueError, match="model.norm: unknown norm 'batchnorm'"):
        make_norm(cfg, rngs=nnx.Rngs(0))


def small_model_cfg(dtype="float32"):
    cfg = load_config(f"llama:tiny,model.dtype={dtype}").model
    cfg.update(d_model=16, mlp_dim=40, init_std=0.3)
    return cfg


def test_swiglu_mlp_matches_numpy():
    mlp = MLP(small_model_cfg(), rngs=nnx.Rngs(3))
    x = np.random.default_rng(2).normal(size=(2, 7, 16)).astype(np.float32)
    y, aux = mlp(jnp.asarray(x))
    assert aux == {}
    gate, up, wo = (np.asarray(w[...], np.float64) for w in (mlp.wi_gate, mlp.wi_up, mlp.wo))
    want = (np_silu(x @ gate) * (x @ up)) @ wo
    assert y.shape == (2, 7, 16) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # Gate and up are not interchangeable: swapping them changes the output.
    swapped = (np_silu(x @ up) * (x @ gate)) @ wo
    assert not np.allclose(swapped, want, atol=1e-3)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gelu_mlp_with_biases_matches_numpy(activation):
    cfg = small_model_cfg()
    cfg.update(mlp_activation=activation, mlp_bias=True)
    mlp = MLP(cfg, rngs=nnx.Rngs(3))
    assert not hasattr(mlp, "wi_gate") and mlp.wi[...].shape == (16, 40)
    rng = np.random.default_rng(9)
    mlp.bi[...] = jnp.asarray(rng.normal(size=40), jnp.float32)
    mlp.bo[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
    wi, bi, wo, bo = (np.asarray(w[...], np.float64) for w in (mlp.wi, mlp.bi, mlp.wo, mlp.bo))
    x = rng.normal(size=(2, 7, 16)).astype(np.float32)
    h = x @ wi + bi
    if activation == "gelu":  # exact: x * Phi(x), HF's "gelu"
        erf = np.vectorize(math.erf)
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    else:
        h = 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    y, _ = mlp(jnp.asarray(x))
    np.testing.assert_allclose(y, h @ wo + bo, rtol=1e-5, atol=1e-5)
    assert MLP.flops_per_token(cfg, 1) == 2 * 2 * 16 * 40


def test_unknown_mlp_activation():
    cfg = small_model_cfg()
    cfg.mlp_activation = "relu2"
    with pytest.raises(ValueError, match="model.mlp_activation: unknown activation 'relu2'"):
        MLP(cfg, rngs=nnx.Rngs(0))


def test_mlp_computes_in_dtype_with_float32_params():
    mlp = MLP(small_model_cfg("bfloat16"), rngs=nnx.Rngs(3))
    assert mlp.wi_gate[...].dtype == jnp.float32
    y, _ = mlp(jnp.ones((1, 2, 16), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16


def test_embed_lookup_and_attend():
    emb = Embed(11, 6, init_std=1.0, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(4))
    table = np.asarray(emb.embedding[...])
    tokens = np.array([[0, 3, 10], [5, 5, 1]])
    np.testing.assert_array_equal(emb(jnp.asarray(tokens)), table[tokens])
    x = np.random.default_rng(5).normal(size=(2, 3, 6)).astype(np.float32)
    logits = emb.attend(jnp.asarray(x))
    assert logits.shape == (2, 3, 11)
    np.testing.assert_allclose(logits, x @ table.T, rtol=1e-5, atol=1e-5)


def test_lm_head_matches_matmul():
    head = LMHead(6, 9, init_std=1.0, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(6))
    x = np.random.default_rng(7).normal(size=(2, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(
        head(jnp.asarray(x)), x @ np.asarray(head.kernel[...]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_embed_param_and_compute_dtypes(param_dtype):
    emb = Embed(7, 4, init_std=1.0, dtype="bfloat16", param_dtype=param_dtype, rngs=nnx.Rngs(0))
    assert emb.embedding[...].dtype == jnp.dtype(param_dtype)
    assert emb(jnp.zeros((1, 2), jnp.int32)).dtype == jnp.bfloat16


def test_class_head_bias_and_zero_init():
    head = ClassHead(6, 3, init_std=0.0, param_dtype="float32", bias=True, rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(head.kernel[...])) and head.bias[...].shape == (3,)
    rng = np.random.default_rng(10)
    kernel, bias = rng.normal(size=(6, 3)), rng.normal(size=3)
    head.kernel[...] = jnp.asarray(kernel, jnp.float32)
    head.bias[...] = jnp.asarray(bias, jnp.float32)
    x = rng.normal(size=(2, 6))
    logits = head(jnp.asarray(x, jnp.bfloat16))
    assert logits.dtype == jnp.float32
    want = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) @ kernel + bias
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
