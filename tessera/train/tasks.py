"""Tasks supply the loss for a batch. ``lm``: next-token cross-entropy with a loss mask."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Summed masked cross-entropy (float32), the token count, and sums for metrics.

    logits [B, T, V]; targets int [B, T]; mask float [B, T]. Returns (loss_sum, weight, stats)
    so micro-batches can be summed before normalising.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (lse - target_logit) * mask
    total = jnp.sum(nll)
    zl = jnp.sum(jnp.square(lse) * mask)
    if z_loss:
        total = total + z_loss * zl
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * mask)
    return total, jnp.sum(mask), {"nll_sum": jnp.sum(nll), "z_sum": zl, "correct": correct}


def lm_loss(model: Callable, batch: Batch, *, z_loss: float = 0.0):
    """Next-token loss for a packed batch (inputs, targets, segment_ids, positions, loss_mask)."""
    out = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    total, weight, stats = cross_entropy(out.logits, batch["targets"], batch["loss_mask"], z_loss)
    aux_total = sum((v for k, v in out.aux.items() if k.endswith("_loss")), jnp.float32(0.0))
    return total + aux_total * weight, weight, stats


TASKS = {"lm": lm_loss}


def get_task(name: str) -> Callable:
    if name not in TASKS:
        raise ValueError(f"train.task: unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
