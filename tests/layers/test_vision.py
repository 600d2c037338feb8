"""Vision layers against independent references: the patch embedding against a strided
convolution with torch's (HF ViT's) weight layout, sin-cos 2-D positions against big_vision's
formula written out, MAP pooling against numpy attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.layers.vision import MAPHead, PatchEmbed, sincos_2d


def test_patch_embed_is_a_strided_conv_in_hf_layout():
    p, c, d = 4, 3, 8
    embed = PatchEmbed(p, c, d, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    embed.bias[...] = jnp.asarray(rng.normal(size=d), jnp.float32)
    images = jnp.asarray(rng.normal(size=(2, 12, 8, c)), jnp.float32)  # a 3 x 2 grid
    got = embed(images)
    assert got.shape == (2, 6, d)
    weight = jnp.transpose(embed.kernel[...], (3, 2, 0, 1))  # HF Conv2d weight [D, C, p, p]
    conv = jax.lax.conv_general_dilated(
        jnp.transpose(images, (0, 3, 1, 2)), weight, window_strides=(p, p), padding="VALID",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    ) + embed.bias[...][None, :, None, None]
    want = conv.reshape(2, d, 6).transpose(0, 2, 1)  # HF: flatten(2).transpose(1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and back: the HF weight transposes to the kernel
    np.testing.assert_array_equal(jnp.transpose(weight, (2, 3, 1, 0)), embed.kernel[...])


@pytest.mark.parametrize("endpoint", [True, False])
def test_sincos_2d_matches_the_formula(endpoint):
    """big_vision's frequencies (endpoint: the last is 1 / temperature), or MAE's / diffusers'
    (``get_2d_sincos_pos_embed``, DiT's): dim / 4 steps short of it."""
    h, w, d = 3, 5, 16
    got = sincos_2d(h, w, d, endpoint=endpoint)
    assert got.shape == (h * w, d) and got.dtype == np.float32
    quarter = d // 4
    for row in range(h):
        for col in range(w):
            for k in range(quarter):
                omega = 1.0 / 10_000 ** (k / (quarter - endpoint))
                want = [math.sin(col * omega), math.cos(col * omega),
                        math.sin(row * omega), math.cos(row * omega)]
                np.testing.assert_allclose(got[row * w + col, k::quarter], want, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(2, 2, 18)


def test_map_head_matches_numpy():
    cfg = load_config("vit:tiny").model
    cfg.update(d_model=16, num_heads=2, num_kv_heads=2, head_dim=4, mlp_dim=24, init_std=0.5)
    head = MAPHead(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    for _, var in nnx.iter_graph(head):  # non-zero biases and norm parameters too
        if isinstance(var, nnx.Param):
            var[...] = jnp.asarray(rng.normal(size=var.shape) * 0.5, jnp.float32)
    x = rng.normal(size=(2, 7, 16))
    got = head(jnp.asarray(x, jnp.float32))
    assert got.shape == (2, 16)

    def param(*path):
        node = head
        for name in path:
            node = getattr(node, name)
        return np.asarray(node[...], np.float64)

    a = lambda name: param("attention", name)
    q = np.einsum("d,dhk->hk", param("probe"), a("wq")) + a("bq")
    k = np.einsum("btd,dhk->bthk", x, a("wk")) + a("bk")
    v = np.einsum("btd,dhk->bthk", x, a("wv")) + a("bv")
    scores = np.einsum("hk,bthk->bht", q, k) / math.sqrt(4)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.einsum("bht,bthk,hkd->bd", probs, v, a("wo")) + a("bo")
    centred = y - y.mean(-1, keepdims=True)
    normed = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + cfg.norm_eps)
    normed = normed * param("norm", "scale") + param("norm", "bias")
    hidden = normed @ param("mlp", "wi") + param("mlp", "bi")
    hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
    want = y + hidden @ param("mlp", "wo") + param("mlp", "bo")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
