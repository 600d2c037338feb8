"""MLA's absorbed attention: queries over one shared key head [latent | k_rope] whose values are
the latent, ``latent_attention(q, latent, k_rope, ..., impl=...)``.

The decode kernel (``impl`` auto or ``pallas_tpu_decode``, one query token on TPU) takes the
latent and rope key apart (`decode.latent_attention`): it reads each latent block once, as key
features and as values, and never builds the concatenated keys, a copy of the whole cache per
step. Every other case concatenates and goes through `attention` with the same ``impl``, whose
registry picks (or refuses, saying why) as for any call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tessera.kernels.attention import attention, decode


def latent_attention(
    q: jax.Array,
    latent: jax.Array,
    k_rope: jax.Array,
    *,
    impl: str = "auto",
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """q [B, T, H, R + Dr], latent [B, S, R], k_rope [B, S, Dr] -> [B, T, H, R]: attention with
    keys ``concat([latent, k_rope])`` (one head shared by all query heads) and values ``latent``.
    Masking arguments as `attention`'s."""
    kw = dict(
        q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window, scale=scale,
    )
    if impl in ("auto", "pallas_tpu_decode") and decode.supports(q, latent, k_rope) is None:
        return decode.latent_attention(q, latent, k_rope, **kw)
    keys = jnp.concatenate([latent, k_rope], axis=-1)[:, :, None]
    return attention(q, keys, latent[:, :, None], impl=impl, **kw)
