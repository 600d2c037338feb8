"""What every sequence mixer receives besides its input: positions, segments, cache slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SeqInfo:
    """Per-token bookkeeping shared by all layers of one forward pass.

    positions:    int32 [B, T] absolute position of each token in its sequence.
    segment_ids:  int32 [B, T] document id for packed rows; 0 marks padding.
    cache_positions: int32 [B, S] position held by each cache slot before this call (-1: empty),
                  or None when running without a cache.
    write_slots:  int32 [B, T] cache slot each token is written to (S: not written), or None.
    """

    positions: jax.Array
    segment_ids: jax.Array
    cache_positions: jax.Array | None = None
    write_slots: jax.Array | None = None


def write_cache(cache: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter ``new`` [B, T, ...] into ``cache`` [B, S, ...] at ``slots`` [B, T] (S: dropped)."""
    b = jnp.arange(cache.shape[0])[:, None]
    return cache.at[b, slots].set(new.astype(cache.dtype), mode="drop")
