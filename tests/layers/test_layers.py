"""Building blocks against hand-written numpy: RMSNorm, the SwiGLU MLP, embedding and LM head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.layers.embeddings import Embed, LMHead
from tessera.layers.mlp import MLP
from tessera.layers.norms import RMSNorm


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
