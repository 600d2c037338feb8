"""RoPE: rotation against hand-written numpy, the relative-position property, and each scaling
type against a transcription of its published formula."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tessera.layers.positions import (
    ROPE_TYPES,
    apply_rope,
    rope_frequencies,
    yarn_softmax_scale,
)


def default_inv_freq(dim, theta):
    return np.array([theta ** (-2.0 * i / dim) for i in range(dim // 2)])


def numpy_rope(x, positions, inv_freq, factor=1.0):
    """Rotate each pair (i, i + D/2) by angle pos * inv_freq[i] with an explicit 2x2 matrix."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                a = positions[b, t] * inv_freq[i]
                rot = factor * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
                pair = np.stack([x[b, t, :, i], x[b, t, :, i + half]])  # [2, H]
                out[b, t, :, i], out[b, t, :, i + half] = rot @ pair
    return out


def test_default_rope_matches_numpy_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 100, 2000, 3, 9]], np.int32)
    inv_freq, factor = rope_frequencies(16, theta=10000.0, scaling=None, max_position=4096)
    assert factor == 1.0 and inv_freq.dtype == jnp.float32 and inv_freq.shape == (8,)
    np.testing.assert_allclose(inv_freq, default_inv_freq(16, 10000.0), rtol=1e-6)
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq)
    # float32 angles (as in HF) near 2000 rad carry ~1e-4 rad of rounding.
    np.testing.assert_allclose(out, numpy_rope(x, positions, default_inv_freq(16, 1e4)),
                               atol=3e-4, rtol=0)
    np.testing.assert_allclose(out[0], numpy_rope(x, positions, default_inv_freq(16, 1e4))[0],
                               atol=2e-6, rtol=0)
    for same in ({"type": "default"}, {"rope_type": "none"}, {}):
        np.testing.assert_array_equal(
            rope_frequencies(16, theta=1e4, scaling=same, max_position=4096)[0], inv_freq)


def test_relative_position_property():
    """q . k after rope depends only on the position difference."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 2, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 2, 32)), jnp.float32)
    inv_freq, _ = rope_frequencies(32, theta=500000.0, scaling=None, max_position=8192)

    def score(m, n):
        qm = apply_rope(q, jnp.full((1, 1), m), inv_freq)
        kn = apply_rope(k, jnp.full((1, 1), n), inv_freq)
        return np.asarray(jnp.sum(qm * kn, -1))

    base = score(5, 2)
    for shift in (1, 17, 300):
        np.testing.assert_allclose(score(5 + shift, 2 + shift), base, atol=1e-4, rtol=1e-4)
    assert not np.allclose(score(6, 2), base, atol=1e-3)


def test_apply_rope_dtype_factor_and_partial_rotary():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(1, 4, 2, 16)), jnp.bfloat16)
    pos = jnp.arange(4)[None]
    inv_freq, _ = rope_frequencies(16, theta=1e4, scaling=None, max_position=64)
    out = apply_rope(x, pos, inv_freq, attention_factor=1.5)
    assert out.dtype == jnp.bfloat16
    norms = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
    np.testing.assert_allclose(jnp.linalg.norm(out.astype(jnp.float32), axis=-1), 1.5 * norms,
                               rtol=2e-2)
    # Partial rotary: 4 frequencies rotate the first 8 features, the last 8 pass through.
    xf = x.astype(jnp.float32)
    inv4, _ = rope_frequencies(8, theta=1e4, scaling=None, max_position=64)
    part = apply_rope(xf, pos, inv4)
    np.testing.assert_array_equal(part[..., 8:], xf[..., 8:])
    np.testing.assert_allclose(part[..., :8], apply_rope(xf[..., :8], pos, inv4))
    with pytest.raises(ValueError, match="too many"):
        apply_rope(xf[..., :6], pos, inv4)


def test_linear_scaling_divides_positions():
    inv_freq, factor = rope_frequencies(
        16, theta=1e4, scaling={"type": "linear", "factor": 4.0}, max_position=4096)
    assert factor == 1.0
    np.testing.assert_allclose(inv_freq, default_inv_freq(16, 1e4) / 4, rtol=1e-6)
    x = np.random.default_rng(3).normal(size=(1, 3, 1, 16)).astype(np.float32)
    positions = np.array([[4, 40, 400]])
    want = numpy_rope(x, positions / 4.0, default_inv_freq(16, 1e4))
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq), want,
                               atol=1e-5)


def dynamic_ntk_numpy(dim, theta, factor, original, seq_len):
    """Dynamic NTK (emozilla / bloc97): past the trained length, grow the base so that the lowest
    frequency stretches over the longer context."""
    if seq_len <= original:
        return default_inv_freq(dim, theta)
    alpha = factor * seq_len / original - (factor - 1)
    return default_inv_freq(dim, theta * alpha ** (dim / (dim - 2)))


@pytest.mark.parametrize("seq_len", [100, 2048, 3000, 8192])
def test_dynamic_ntk(seq_len):
    scaling = {"type": "dynamic", "factor": 2.0}
    inv_freq, factor = rope_frequencies(64, theta=1e4, scaling=scaling, max_position=2048,
                                        seq_len=seq_len)
    assert factor == 1.0
    want = dynamic_ntk_numpy(64, 1e4, 2.0, 2048, seq_len)
    np.testing.assert_allclose(inv_freq, want, rtol=1e-6)
    # The same from a traced length (e.g. max(positions) + 1 inside jit).
    traced = jax.jit(lambda n: rope_frequencies(64, theta=1e4, scaling=scaling,
                                                max_position=2048, seq_len=n)[0])(seq_len)
    np.testing.assert_allclose(traced, want, rtol=1e-5)
    if seq_len <= 2048:
        np.testing.assert_allclose(inv_freq, default_inv_freq(64, 1e4), rtol=1e-6)
    else:
        assert np.all(np.asarray(inv_freq)[1:] < default_inv_freq(64, 1e4)[1:])


def yarn_numpy(dim, theta, factor, original, beta_fast=32.0, beta_slow=1.0):
    """YaRN "NTK-by-parts" (Peng et al. 2023, as in HF): a dimension whose frequency completes
    more than beta_fast turns over the original context keeps its frequency, one with fewer than
    beta_slow turns is interpolated (divided by factor), with a linear ramp in between over the
    integer-rounded dimension range; attention scaled by 0.1 ln(factor) + 1."""
    def dim_for_turns(turns):  # solve original / (2 pi theta^(2d/dim)) = turns for d
        return dim * math.log(original / (2 * math.pi * turns)) / (2 * math.log(theta))

    lo = max(math.floor(dim_for_turns(beta_fast)), 0)
    hi = min(math.ceil(dim_for_turns(beta_slow)), dim - 1)
    out = []
    for i, f in enumerate(default_inv_freq(dim, theta)):
        interp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: keep, 1: divide by factor
        out.append(f * (1 - interp) + f / factor * interp)
    return np.array(out), 0.1 * math.log(factor) + 1


def test_yarn():
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    inv_freq, factor = rope_frequencies(64, theta=1e4, scaling=scaling, max_position=8192)
    want, want_factor = yarn_numpy(64, 1e4, 4.0, 2048)
    np.testing.assert_allclose(inv_freq, want, rtol=1e-6)
    assert factor == pytest.approx(want_factor) and factor == pytest.approx(1.1386294361)
    base = default_inv_freq(64, 1e4)
    np.testing.assert_allclose(inv_freq[:4], base[:4], rtol=1e-6)  # fast dims kept
    np.testing.assert_allclose(inv_freq[-4:], base[-4:] / 4, rtol=1e-6)  # slow dims interpolated
    # An explicit attention_factor and non-default betas are honoured.
    scaling.update(attention_factor=0.9, beta_fast=16, beta_slow=2)
    inv_freq, factor = rope_frequencies(64, theta=1e4, scaling=scaling, max_position=8192)
    assert factor == 0.9
    np.testing.assert_allclose(inv_freq, yarn_numpy(64, 1e4, 4.0, 2048, 16, 2)[0], rtol=1e-6)


def test_yarn_deepseek_mscale():
    """DeepSeek's yarn (HF's _compute_yarn_parameters, yarn_apply_mscale): cos/sin scaled by
    m(mscale) / m(mscale_all_dim), m(s) = 0.1 s ln(factor) + 1, and the softmax scale by
    m(mscale_all_dim)^2; the base config's unset (0) mscale fields change nothing."""
    from tessera.configs.base import base_config

    deepseek = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 0.6}
    inv_freq, factor = rope_frequencies(64, theta=1e4, scaling=deepseek, max_position=163840)
    m = lambda s: 0.1 * s * math.log(40.0) + 1
    assert factor == pytest.approx(m(0.8) / m(0.6))
    np.testing.assert_allclose(inv_freq, yarn_numpy(64, 1e4, 40.0, 4096)[0], rtol=1e-6)
    assert yarn_softmax_scale(deepseek, 163840) == pytest.approx(m(0.6) ** 2)
    for published in (0.707, 1.0):  # V2-Lite, V3: mscale == mscale_all_dim
        same = {**deepseek, "mscale": published, "mscale_all_dim": published}
        assert rope_frequencies(64, theta=1e4, scaling=same, max_position=163840)[1] == 1.0
    # The base config's fields (mscale = mscale_all_dim = 0) keep yarn as it was.
    scaling = base_config().model.rope_scaling
    scaling.update(type="yarn", factor=4.0, original_max_position_embeddings=2048)
    assert rope_frequencies(64, theta=1e4, scaling=scaling, max_position=8192)[1] == (
        pytest.approx(0.1 * math.log(4.0) + 1))
    assert yarn_softmax_scale(scaling, 8192) == 1.0
    assert yarn_softmax_scale({"type": "llama3", "mscale_all_dim": 1.0}, 8192) == 1.0


def llama3_numpy(dim, theta, factor, low_freq_factor, high_freq_factor, original):
    """Llama 3.1: wavelengths shorter than original / high_freq_factor are kept, longer than
    original / low_freq_factor divided by factor, and in between blended by how many times the
    wavelength fits into the original context."""
    out = []
    for f in default_inv_freq(dim, theta):
        wavelength = 2 * math.pi / f
        if wavelength < original / high_freq_factor:
            out.append(f)
        elif wavelength > original / low_freq_factor:
            out.append(f / factor)
        else:
            smooth = (original / wavelength - low_freq_factor) / (
                high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def test_llama3():
    scaling = ml_collections.ConfigDict(dict(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))
    inv_freq, factor = rope_frequencies(128, theta=500000.0, scaling=scaling, max_position=131072)
    assert factor == 1.0
    want = llama3_numpy(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(inv_freq, want, rtol=1e-6)
    base = default_inv_freq(128, 500000.0)
    ratio = base / np.asarray(inv_freq, np.float64)
    assert np.allclose(ratio[:20], 1, rtol=1e-6) and np.allclose(ratio[-20:], 8, rtol=1e-6)
    assert np.any((ratio > 1.01) & (ratio < 7.99))  # the smoothed band is not empty


def test_scaling_errors():
    with pytest.raises(ValueError, match="known types: " + ", ".join(ROPE_TYPES)):
        rope_frequencies(16, theta=1e4, scaling={"type": "longrope"}, max_position=64)
    with pytest.raises(ValueError, match="'factor'"):
        rope_frequencies(16, theta=1e4, scaling={"type": "linear"}, max_position=64)
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_frequencies(16, theta=1e4, scaling={"type": "llama3", "factor": 8.0},
                         max_position=64)
