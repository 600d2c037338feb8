"""Parameter creation with logical axis names, and dtype helpers shared by every layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def dtype_of(name: str | jnp.dtype) -> jnp.dtype:
    """``"bfloat16"`` -> ``jnp.bfloat16``; a clear error for names jnp does not know."""
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {name!r}") from e


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: str | jnp.dtype,
) -> nnx.Param:
    """A parameter whose axes carry logical names (read by ``sharding.state_shardings``)."""
    if len(axes) != len(shape):
        raise ValueError(f"param: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype_of(dtype)), logical_axes=tuple(axes))


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


def ones(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


def zeros(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


def cast(p: nnx.Param, dtype: jnp.dtype) -> jax.Array:
    """A parameter's value in the compute dtype."""
    return jnp.asarray(p[...], dtype)
