"""``classify``: one label per example, softmax cross-entropy over ``model.num_classes`` classes.

Two kinds of input, chosen by ``data.source``:

  images  (``shapes | image_folder | npz | array_record``, ``data/image_pipeline.py``): batches
          ``images`` float32 [B, H, W, C] in [-1, 1] and ``label``; the model (a ViT) is called
          as ``model(images, rng=rng, train=train)``, so dropout and stochastic depth draw from
          the step RNG in training and are off in evaluation.
  tokens  (the embedded corpus labelled by rule, ``data/classify.py``): ``inputs``,
          ``segment_ids``, ``positions`` and ``label``; the model (``sequence_classifier``) is
          called with the batch's ``inputs`` and its other non-label keys as keyword arguments.

Either way the model returns logits [B, num_classes]. ``train.label_smoothing`` mixes the one-hot
target with the uniform distribution (the loss; ``nll`` is then logged unsmoothed); metrics:
``accuracy`` (top-1) and, with more than five classes, ``top5_accuracy``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tessera.configs.base import ConfigDict
from tessera.data import (
    IMAGE_SOURCES,
    DataIterator,
    make_image_pipeline,
    make_rule_pipeline,
    parse_tasks,
)
from tessera.train.flops import stack_flops_per_token, vit_flops_per_example
from tessera.train.tasks.base import Batch, Feature, Sums, Task, add_aux_losses

LABEL = "label"
TOP_K = 5


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array, Sums]:
    """(summed loss, number of real rows, metric sums) in float32.

    logits [B, C]; labels int [B], negative on padding rows (weight 0). The loss is the cross
    entropy with the target ``(1 - label_smoothing) * one_hot + label_smoothing / C``; the sums
    are ``accuracy`` (correct rows), for C > 5 ``top5_accuracy``, and with smoothing ``nll``
    (the unsmoothed loss).
    """
    logits = logits.astype(jnp.float32)
    classes = logits.shape[-1]
    valid = (labels >= 0).astype(jnp.float32)
    safe = jnp.maximum(labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    loss = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == labels) * valid
    sums = {"accuracy": jnp.sum(correct)}
    if label_smoothing:
        sums["nll"] = jnp.sum(nll * valid)
    if classes > TOP_K:
        true_logit = jnp.take_along_axis(logits, safe[:, None], axis=-1)
        rank = jnp.sum(logits > true_logit, axis=-1)  # classes scoring above the true one
        sums["top5_accuracy"] = jnp.sum((rank < TOP_K) * valid)
    return jnp.sum(loss * valid), jnp.sum(valid), sums


class ClassifyTask(Task):
    """Classification of images or token rows (module docstring)."""

    name = "classify"

    def __init__(self, config: ConfigDict, workdir: str = ""):
        super().__init__(config, workdir)
        classes = config.model.num_classes
        if classes <= 0:
            raise ValueError(
                f"task classify needs model.num_classes > 0 (the number of classes), got {classes}"
            )
        smoothing = config.train.label_smoothing
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {smoothing}")
        self.images = config.data.source in IMAGE_SOURCES
        if self.images and config.model.name != "vit":
            raise ValueError(
                f"data.source={config.data.source!r} gives images: task classify needs an image "
                f"model (model.name='vit'), got model.name={config.model.name!r}"
            )
        rules = parse_tasks(config.data.synthetic_tasks)
        if config.data.source == "synthetic" and len(rules) > classes:
            raise ValueError(
                f"model.num_classes={classes} is fewer than the {len(rules)} rules of "
                f"data.synthetic_tasks ({', '.join(rules)})"
            )

    def features(self) -> dict[str, Feature]:
        label = Feature((), "int32", ("batch",))
        if self.images:
            m = self.config.model
            shape = (m.image_size, m.image_size, m.num_channels)
            return {"images": Feature(shape, "float32", ("batch", None, None, None)), LABEL: label}
        tokens = Feature((self.config.data.seq_len,), "int32", ("batch", "length"))
        return {"inputs": tokens, "segment_ids": tokens, "positions": tokens, LABEL: label}

    def make_data(
        self, split: str, *, process_index: int = 0, process_count: int = 1
    ) -> DataIterator:
        if not self.images:
            return make_rule_pipeline(
                self.data_config(split), **self.pipeline_args(split, process_index, process_count)
            )
        data, model = self.data_config(split), self.config.model
        return make_image_pipeline(
            data,
            global_batch_size=data.global_batch_size,
            image_size=model.image_size,
            split=split,
            process_index=process_index,
            process_count=process_count,
            seed=data.seed,
            num_classes=model.num_classes,
        )

    def loss(
        self, model: Any, batch: Batch, rng: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, jax.Array, Sums]:
        if self.images:
            out = model(batch["images"], rng=rng, train=train)
        else:
            kwargs = {k: v for k, v in batch.items() if k not in ("inputs", LABEL)}
            out = model(batch["inputs"], **kwargs)
        if out.logits.shape != (batch[LABEL].shape[0], self.config.model.num_classes):
            raise ValueError(
                f"task classify needs logits [batch, model.num_classes]; model.name="
                f"{self.config.model.name!r} gives shape {out.logits.shape} (use a classifier "
                f"such as sequence_classifier or vit)"
            )
        smoothing = self.config.train.label_smoothing
        total, weight, sums = softmax_cross_entropy(out.logits, batch[LABEL], smoothing)
        total, aux_sums = add_aux_losses(total, weight, out.aux)
        return total, weight, {**sums, **aux_sums}

    def flops_per_example(self) -> float | None:
        m = self.config.model
        if self.images:
            return vit_flops_per_example(m)
        seq_len = self.config.data.seq_len
        per_token = stack_flops_per_token(m, seq_len)
        return None if per_token is None else per_token * seq_len + 2 * m.d_model * m.num_classes

    def throughput_unit(self) -> tuple[str, int]:
        return ("images", 1) if self.images else ("examples", 1)
