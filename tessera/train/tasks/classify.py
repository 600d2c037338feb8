"""``classify``: one label per example, softmax cross-entropy over ``model.num_classes`` classes.

For now the data is the embedded corpus labelled by rule (``data/classify.py``): which of
``data.synthetic_tasks`` an example follows. The model is called with the batch's ``inputs`` and
its other non-label keys as keyword arguments, and returns logits [B, num_classes]; a new kind of
input (images) needs a pipeline and its features here, not a new loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tessera.configs.base import ConfigDict
from tessera.data import DataIterator, make_rule_pipeline, parse_tasks
from tessera.train.flops import stack_flops_per_token
from tessera.train.tasks.base import Batch, Feature, Sums, Task, add_aux_losses

LABEL = "label"


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array, Sums]:
    """(summed loss, number of real rows, {"accuracy": correct rows}) in float32.

    logits [B, C]; labels int [B], negative on padding rows (weight 0).
    """
    logits = logits.astype(jnp.float32)
    valid = (labels >= 0).astype(jnp.float32)
    safe = jnp.maximum(labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels) * valid
    return jnp.sum(nll * valid), jnp.sum(valid), {"accuracy": jnp.sum(correct)}


class ClassifyTask(Task):
    """Classification; metrics ``accuracy`` (train and eval) besides the loss."""

    name = "classify"

    def __init__(self, config: ConfigDict, workdir: str = ""):
        super().__init__(config, workdir)
        classes = config.model.num_classes
        if classes <= 0:
            raise ValueError(
                f"task classify needs model.num_classes > 0 (the number of classes), got {classes}"
            )
        rules = parse_tasks(config.data.synthetic_tasks)
        if config.data.source == "synthetic" and len(rules) > classes:
            raise ValueError(
                f"model.num_classes={classes} is fewer than the {len(rules)} rules of "
                f"data.synthetic_tasks ({', '.join(rules)})"
            )

    def features(self) -> dict[str, Feature]:
        tokens = Feature((self.config.data.seq_len,), "int32", ("batch", "length"))
        return {
            "inputs": tokens,
            "segment_ids": tokens,
            "positions": tokens,
            LABEL: Feature((), "int32", ("batch",)),
        }

    def make_data(
        self, split: str, *, process_index: int = 0, process_count: int = 1
    ) -> DataIterator:
        return make_rule_pipeline(
            self.data_config(split), **self.pipeline_args(split, process_index, process_count)
        )

    def loss(
        self, model: Any, batch: Batch, rng: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, jax.Array, Sums]:
        del rng  # deterministic
        kwargs = {k: v for k, v in batch.items() if k not in ("inputs", LABEL)}
        out = model(batch["inputs"], **kwargs)
        if out.logits.shape != (batch[LABEL].shape[0], self.config.model.num_classes):
            raise ValueError(
                f"task classify needs logits [batch, model.num_classes]; model.name="
                f"{self.config.model.name!r} gives shape {out.logits.shape} (use a classifier "
                f"such as sequence_classifier)"
            )
        total, weight, sums = softmax_cross_entropy(out.logits, batch[LABEL])
        total, aux_sums = add_aux_losses(total, weight, out.aux)
        return total, weight, {**sums, **aux_sums}

    def flops_per_example(self) -> float | None:
        m, seq_len = self.config.model, self.config.data.seq_len
        per_token = stack_flops_per_token(m, seq_len)
        return None if per_token is None else per_token * seq_len + 2 * m.d_model * m.num_classes
