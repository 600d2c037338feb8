"""The RNG a task's loss receives: one stream per step, derived from ``train.seed`` alone, so a
resumed run draws the same numbers (dropout, diffusion noise, router jitter)."""

from __future__ import annotations

import jax


def step_rng(seed: int, step: int | jax.Array, micro: int | jax.Array | None = None) -> jax.Array:
    """Key of train step ``step`` (1-based, as logged): ``fold_in(key(seed), step)``, with the
    micro-batch index folded in under gradient accumulation."""
    rng = jax.random.fold_in(jax.random.key(seed), step)
    return rng if micro is None else jax.random.fold_in(rng, micro)


def eval_rng(seed: int, batch: int | jax.Array) -> jax.Array:
    """Key of evaluation batch ``batch``: the same at every evaluation, so they compare. Step 0 is
    never a train step, so its stream is free for evaluation."""
    return step_rng(seed, 0, batch)
