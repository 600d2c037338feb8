"""Training-time noise: dropout (per element) and drop path / stochastic depth (per example).

Both take an explicit PRNG key and scale what they keep by 1 / keep probability, so the
expected output equals the input and evaluation needs no rescaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zero each element of x with probability ``rate`` (static, in [0, 1)), scale the rest."""
    if rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def drop_path(x: jax.Array, rate: float | jax.Array, key: jax.Array) -> jax.Array:
    """Zero whole examples (x [B, ...]) with probability ``rate`` (may be traced, in [0, 1]).

    At ``rate`` 1 every example is zeroed, with zero (finite) gradients.
    """
    keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
    keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    scale = jnp.where(keep, 1.0 / jnp.maximum(keep_prob, 1e-6), 0.0)
    return x * scale.astype(x.dtype)
