"""Parameter creation with logical axis names, dtype helpers shared by every layer, and the
declaration of parameters updated by a rule instead of the optimizer (``RuleUpdate``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class RuleUpdate:
    """A parameter the optimizer leaves alone: after every applied train step it is replaced by
    ``fn(block_cfg, value, stat)``, where ``stat`` is the statistic ``stat`` its own layer
    emitted in the step's aux (averaged over the step's micro-batches). Mixers list theirs in
    ``RULE_UPDATES``; ``param`` names the attribute (absent / None: nothing to update). ``fn``
    sees one layer's parameter and statistic (stacked layers are mapped over)."""

    param: str
    stat: str
    fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
