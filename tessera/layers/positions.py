"""Rotary position embeddings (RoPE) with the context-extension scalings of HF transformers.

`rope_frequencies` turns a head size, base and scaling spec into inverse frequencies plus the
factor HF multiplies cos/sin by; `apply_rope` rotates queries or keys with them. The scaling
semantics follow `transformers.modeling_rope_utils` so imported checkpoints reproduce their logits:

  default / none  inv_freq[i] = theta ** (-2i / head_dim)
  linear          inv_freq / factor (positions divided by factor)
  dynamic         dynamic NTK: theta rescaled once the sequence outgrows `max_position`
                  (HF's config.max_position_embeddings); a function of `seq_len`
  yarn            NTK-by-parts: interpolate low frequencies, keep high ones, linear ramp between;
                  attention_factor defaults to 0.1 * ln(factor) + 1, or with DeepSeek's mscale
                  and mscale_all_dim both set (non-zero) to m(mscale) / m(mscale_all_dim),
                  m(s) = 0.1 * s * ln(factor) + 1 (HF's _compute_yarn_parameters);
                  `yarn_softmax_scale` gives DeepSeek's matching softmax-scale factor
  llama3          Llama 3.1 wavelength-based smoothing between unchanged and factor-divided bands
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "none", "linear", "dynamic", "yarn", "llama3")


def _scaling_dict(scaling: Any) -> dict:
    if scaling is None:
        return {}
    if hasattr(scaling, "to_dict"):  # ml_collections.ConfigDict
        return scaling.to_dict()
    if isinstance(scaling, Mapping):
        return dict(scaling)
    kind = type(scaling).__name__
    raise TypeError(f"rope scaling must be a dict, ConfigDict or None, got {kind}")


def _need(cfg: dict, kind: str, key: str) -> float:
    if cfg.get(key) is None:
        raise ValueError(f"rope scaling type {kind!r} needs key {key!r}; got {sorted(cfg)}")
    return float(cfg[key])


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(cfg: dict, max_position: int) -> tuple[int, float]:
    """(original context, factor): HF takes factor = max_position / original when unset."""
    original = cfg.get("original_max_position_embeddings") or max_position
    return original, float(cfg.get("factor") or max_position / original)


def yarn_softmax_scale(scaling: Any, max_position: int) -> float:
    """DeepSeek's yarn correction of the softmax scale: ``m(mscale_all_dim) ** 2`` with
    ``m(s) = 0.1 * s * ln(factor) + 1`` (1 for factor <= 1), as HF's ``yarn_apply_mscale``
    multiplies ``1 / sqrt(qk_head_dim)`` by; 1.0 unless ``scaling`` is yarn with a non-zero
    ``mscale_all_dim``. Only multi-head latent attention applies it (HF applies it in DeepSeek's
    attention only)."""
    cfg = _scaling_dict(scaling)
    kind = cfg.get("type") or cfg.get("rope_type") or "default"
    mscale_all_dim = cfg.get("mscale_all_dim")
    if kind != "yarn" or not mscale_all_dim:
        return 1.0
    _, factor = _yarn_factor(cfg, max_position)
    return _yarn_mscale(factor, float(mscale_all_dim)) ** 2


def _yarn(inv_freq: np.ndarray, head_dim: int, theta: float, cfg: dict, max_position: int):
    original, factor = _yarn_factor(cfg, max_position)
    attention_factor = cfg.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = cfg.get("mscale"), cfg.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = cfg.get("beta_fast") or 32
    beta_slow = cfg.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # Feature index whose frequency turns `rotations` times over the original context.
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0.0, 1.0)
    # ramp 0: high frequency, kept (extrapolated); ramp 1: low frequency, divided by factor.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1.0 - ramp)
    return inv_freq, float(attention_factor)


def _llama3(inv_freq: np.ndarray, cfg: dict) -> np.ndarray:
    factor = _need(cfg, "llama3", "factor")
    low = _need(cfg, "llama3", "low_freq_factor")
    high = _need(cfg, "llama3", "high_freq_factor")
    original = _need(cfg, "llama3", "original_max_position_embeddings")
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(
        wavelen > original / low,
        inv_freq / factor,
        np.where(wavelen < original / high, inv_freq, medium),
    )


def rope_frequencies(
    head_dim: int,
    *,
    theta: float,
    scaling: Mapping | None = None,
    max_position: int,
    seq_len: int | jax.Array | None = None,
) -> tuple[jax.Array, float]:
    """Inverse frequencies float32 [head_dim // 2] and the cos/sin factor (attention_factor).

    head_dim: the rotated width (head size times HF's partial_rotary_factor).
    scaling: None or a dict / ConfigDict with `type` (or HF's `rope_type`) in ROPE_TYPES and that
    type's keys: factor, original_max_position_embeddings, low_freq_factor, high_freq_factor,
    beta_fast, beta_slow. Like HF, only yarn reads attention_factor (and mscale, mscale_all_dim,
    truncate), and yarn takes factor = max_position / original_max_position_embeddings if unset.
    max_position: the model's max_position_embeddings. seq_len: the current length, read by
    `dynamic` only (HF uses max(position_ids) + 1); may be traced; None means max_position.
    """
    cfg = _scaling_dict(scaling)
    kind = cfg.get("type") or cfg.get("rope_type") or "default"
    if kind not in ROPE_TYPES:
        known = ", ".join(ROPE_TYPES)
        raise ValueError(f"unknown rope scaling type {kind!r}; known types: {known}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope head_dim must be even and >= 2, got {head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / theta**exponents
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / _need(cfg, kind, "factor")
    elif kind == "dynamic":
        factor = _need(cfg, kind, "factor")
        if seq_len is None or isinstance(seq_len, (int, np.integer)):
            length = max(seq_len or 0, max_position)
        else:
            length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_position)
        stretch = factor * length / max_position - (factor - 1)
        inv_freq = 1.0 / (theta * stretch ** (head_dim / (head_dim - 2))) ** exponents
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(inv_freq, head_dim, theta, cfg, max_position)
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, cfg)
    return jnp.asarray(inv_freq, jnp.float32), attention_factor


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    attention_factor: float = 1.0,
) -> jax.Array:
    """Rotate x [B, T, H, D] by positions int [B, T]; returns x's shape and dtype.

    HF "rotate_half" layout: feature i pairs with i + R, R = len(inv_freq), at angle
    position * inv_freq[i]. With 2R < D only the first 2R features rotate (partial rotary), the
    rest pass through. Computed in float32; cos and sin are scaled by attention_factor as in HF.
    """
    half = inv_freq.shape[-1]
    if x.ndim != 4 or positions.shape != x.shape[:2]:
        raise ValueError(f"apply_rope wants x [B, T, H, D] and positions [B, T]; got "
                         f"{x.shape} and {positions.shape}")
    if 2 * half > x.shape[-1]:
        raise ValueError(f"inv_freq has {half} frequencies, too many for head dim {x.shape[-1]}")
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq.astype(jnp.float32)
    cos = jnp.cos(angles) * attention_factor  # [B, T, 1, R]
    sin = jnp.sin(angles) * attention_factor
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)
