"""``lm``: next-token cross-entropy over packed rows of the text pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tessera.data import DataIterator, make_pipeline, unigram_entropy
from tessera.train.flops import forward_flops_per_token
from tessera.train.tasks.base import Batch, Feature, Sums, Task, add_aux_losses


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array, Sums]:
    """Summed masked cross-entropy (float32), the token count, and sums for metrics.

    logits [B, T, V]; targets int [B, T]; mask float [B, T]. Returns (loss_sum, weight,
    {"nll", "accuracy"} sums) so micro-batches can be summed before normalising; ``z_loss`` adds
    ``z_loss * logsumexp**2`` per token.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.sum((lse - target_logit) * mask)
    total = nll
    if z_loss:
        total = total + z_loss * jnp.sum(jnp.square(lse) * mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * mask)
    return total, jnp.sum(mask), {"nll": nll, "accuracy": correct}


def chunked_cross_entropy(
    readout: Any, x: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array, Sums]:
    """``cross_entropy(readout(x), ...)`` over sequence chunks of ``chunk`` positions: a scan whose
    body is rematerialised, so only one chunk's logits [B, chunk, V] live at a time, forward or
    backward. x [B, T, D] with T a multiple of ``chunk``; same sums as the unchunked form."""
    b, t, d = x.shape
    n = t // chunk
    split = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(xs):
        xc, tc, mc = xs
        return cross_entropy(readout(xc), tc, mc, z_loss)

    def body(carry, xs):
        return jax.tree.map(jnp.add, carry, one(xs)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, (split(x)[0], split(targets)[0],
                                                             split(mask)[0])))
    out, _ = jax.lax.scan(body, zero, (split(x), split(targets), split(mask)))
    return out


class LMTask(Task):
    """Language modelling on the packed text pipeline (``data.*``); metrics ``nll`` and token
    ``accuracy``, plus ``perplexity`` in evaluation; ``train.z_loss`` optional."""

    name = "lm"

    def features(self) -> dict[str, Feature]:
        tokens = Feature((self.config.data.seq_len,), "int32", ("batch", "length"))
        return {
            "inputs": tokens,
            "targets": tokens,
            "segment_ids": tokens,
            "positions": tokens,
            "loss_mask": Feature((self.config.data.seq_len,), "float32", ("batch", "length")),
        }

    def make_data(
        self, split: str, *, process_index: int = 0, process_count: int = 1
    ) -> DataIterator:
        return make_pipeline(
            self.data_config(split), **self.pipeline_args(split, process_index, process_count)
        )

    def loss(
        self, model: Any, batch: Batch, rng: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, jax.Array, Sums]:
        del rng, train  # deterministic
        z_loss = float(self.config.train.z_loss)
        args = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        targets, mask = batch["targets"], batch["loss_mask"]
        chunk, t = int(self.config.train.loss_chunk), batch["inputs"].shape[1]
        if chunk > 0 and t > chunk and t % chunk == 0:
            x, info, _, aux = model.features(batch["inputs"], **args)
            total, weight, sums = chunked_cross_entropy(
                lambda h: model._readout(h, info), x, targets, mask, chunk, z_loss
            )
        else:
            out = model(batch["inputs"], **args)
            if out.logits.ndim != 3:
                raise ValueError(
                    f"task lm needs a model with vocabulary logits [batch, length, vocab]; "
                    f"model.name={self.config.model.name!r} gives shape {out.logits.shape}"
                )
            total, weight, sums = cross_entropy(out.logits, targets, mask, z_loss)
            aux = out.aux
        total, aux_sums = add_aux_losses(total, weight, aux)
        segments = batch["segment_ids"]
        packing = {  # real tokens and slots of the packed rows: their ratio is logged as packing
            "packing": jnp.sum(segments != 0, dtype=jnp.float32),
            "slots": jnp.float32(segments.size),
        }
        return total, weight, {**sums, **aux_sums, **packing}

    def metrics(self, sums: Mapping[str, jax.Array], weight: jax.Array) -> dict[str, jax.Array]:
        """Sums over the token weight, and ``packing``: the fraction of row slots holding real
        tokens (data.packing's efficiency)."""
        sums = dict(sums)
        slots = sums.pop("slots", None)
        packing = sums.pop("packing", None)
        out = super().metrics(sums, weight)
        if slots is not None and packing is not None:
            out["packing"] = packing / slots
        return out

    def eval_metrics(
        self, sums: Mapping[str, jax.Array], weight: jax.Array
    ) -> dict[str, jax.Array]:
        metrics = self.metrics(sums, weight)
        return {**metrics, "perplexity": jnp.exp(metrics["nll"])}

    def extra_eval(self, params: Any, trainer: Any) -> dict[str, float]:
        """For ``data.source="seqio"``: the seqio task's metric functions on the first
        ``eval.seqio_examples`` examples of its eval split (``train/seqio_eval.py``)."""
        if self.data_config("eval").get("source") != "seqio" or not int(
            self.config.eval.get("seqio_examples", 0) or 0
        ):
            return {}
        if getattr(self, "_seqio_eval", None) is None:
            from tessera.train.seqio_eval import SeqioEvaluator

            self._seqio_eval = SeqioEvaluator(trainer)
        return self._seqio_eval(params)

    def flops_per_example(self) -> float | None:
        seq_len = self.config.data.seq_len
        per_token = forward_flops_per_token(self.config.model, seq_len)
        return None if per_token is None else per_token * seq_len

    def throughput_unit(self) -> tuple[str, int]:
        return "tokens", self.config.data.seq_len

    def summary(self) -> str | None:
        data = self.config.data
        if data.source != "synthetic":
            return None
        entropy = unigram_entropy(
            tokenizer=self.tokenizer, seed=data.seed, tasks=data.synthetic_tasks or None
        )
        return f"the corpus's unigram entropy is {entropy:.4f} nats/token"
