"""Optimizer from ``config.optim``: AdamW, warmup + cosine/linear/constant, clipping, decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from tessera.configs.base import ConfigDict


def make_schedule(optim: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` then decay to ``end_lr_factor * learning_rate``."""
    lr, warmup = float(optim.learning_rate), int(optim.warmup_steps)
    end = lr * float(optim.end_lr_factor)
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim.end_lr_factor)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif optim.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(
            f"optim.schedule: unknown {optim.schedule!r}; known: cosine, linear, constant"
        )
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(axis_names: Any) -> Any:
    """Weight decay on matrices only: from a tree of logical axis-name tuples, True where a
    parameter has two or more axes besides the stacked ``layers`` axis (norm scales and biases
    are not decayed)."""
    return jax.tree.map(
        lambda names: sum(n != "layers" for n in names) >= 2,
        axis_names,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def make_optimizer(
    optim: ConfigDict, total_steps: int, mask: Any = None, frozen: Any = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and its learning-rate schedule; ``mask``: tree of bools (decay or not).

    ``frozen``: tree of bools, True for parameters the optimizer must leave alone (rule-updated,
    ``layers/base.py: RuleUpdate``): their gradients are zeroed before clipping and they are not
    decayed, so their update is exactly zero. None (or no True leaf): the plain chain.
    """
    if optim.name != "adamw":
        raise ValueError(f"optim.name: unknown optimizer {optim.name!r}; known: adamw")
    schedule = make_schedule(optim, total_steps)
    chain = []
    if frozen is not None and any(jax.tree.leaves(frozen)):
        chain.append(optax.masked(optax.set_to_zero(), frozen))
        decayed = mask if mask is not None else jax.tree.map(lambda f: True, frozen)
        mask = jax.tree.map(lambda d, f: bool(d) and not f, decayed, frozen)
    if optim.clip_norm and optim.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    chain.append(
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=mask,
        )
    )
    return optax.chain(*chain), schedule
