"""seqio's metric functions in the LM task's evaluation (`data.source="seqio"`).

For the seqio Task `data.task` (or each Task of a Mixture) that defines metric functions, the
first `eval.seqio_examples` examples of its eval split (`data.eval_split`, in order, the same on
every process) are scored and predicted with the current parameters:

* predictions (`task.predict_metric_fns`, `metric(targets, predictions)`): greedy decoding with
  tessera's `Decoder`, the prompt being the example's `"inputs"` ids as the task made them, at
  most `len(targets)` new tokens, stopping at the EOS; the ids are decoded with the targets
  vocabulary and passed through the task's `postprocess_fn(..., is_target=False)`. Tasks
  without an `"inputs"` feature have no prompt, so their prediction metrics are not run.
* scores (`task.score_metric_fns`, `metric(targets, scores)`): the summed log-likelihood of the
  target ids after the inputs (for a targets-only task: of the targets after the first token).

Targets are `targets_pretokenized` when the task keeps it, else the decoded target ids, through
`postprocess_fn(..., is_target=True)`, as seqio's own evaluator does. Examples whose inputs +
targets do not fit a row (`data.seq_len + 1`) and the context (`model.max_seq_len`) are left
out; `seqio/examples` counts those used. Numeric metric values are returned as
`seqio/<metric>` (`seqio/<task>/<metric>` for a Mixture's tasks).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tessera.data.seqio_source import (
    document_keys,
    feature_lengths,
    get_provider,
    quiet_options,
    seqio_split,
)
from tessera.distributed import to_host
from tessera.serve.engine import Decoder
from tessera.serve.sampling import SamplingParams
from tessera.sharding import use_mesh

PyTree = Any


def metric_tasks(data_cfg: Any) -> list[Any]:
    """The seqio Tasks of `data.task` (itself, or a Mixture's Tasks) that define metric functions
    and have the eval split."""
    import seqio

    provider = get_provider(data_cfg)
    tasks = list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]
    split = seqio_split(data_cfg, "eval")
    return [
        t for t in tasks
        if (t.predict_metric_fns or t.score_metric_fns) and split in tuple(t.splits)
    ]


def _number(value: Any) -> float | None:
    """A metric value as a float (seqio.metrics.Scalar's `.value` too); None if not numeric."""
    value = getattr(value, "value", value)
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError):
        return None


class SeqioEvaluator:
    """Runs seqio metric functions for a Trainer's LM task; keeps its Decoder and scoring
    program between evaluations (built on first use)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.config = trainer.config
        self._decoder: Decoder | None = None
        self._score = None

    # -- model calls -------------------------------------------------------------------------
    def _decoder_for(self, params: PyTree) -> Decoder:
        t = self.trainer
        if self._decoder is None:
            self._decoder = Decoder(t.spec, None, t.mesh, t.rules, tokenizer=t.task.tokenizer)
        d = self._decoder
        d.params = jax.device_put(t.spec.unstack(params) if d.spec is not t.spec else params,
                                  d.param_shardings)
        return d

    def _scores(self, params: PyTree, docs: list[np.ndarray], starts: list[int]) -> list[float]:
        """Summed log-probabilities of `doc[start:]` given `doc[:start]`, one document per row of
        batches shaped like the training batch."""
        t, data = self.trainer, self.config.data
        rows, seq = int(data.global_batch_size), int(data.seq_len)
        per = rows // jax.process_count()
        first = jax.process_index() * per
        if self._score is None:
            def score(params, batch):
                with use_mesh(t.mesh, t.rules):
                    out = t.spec.merge(params)(
                        batch["inputs"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"],
                    )
                    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
                    hit = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
                    return jnp.sum(hit * batch["loss_mask"], axis=-1)

            self._score = jax.jit(score)
        out: list[float] = []
        for lo in range(0, len(docs), rows):
            batch = {
                "inputs": np.zeros((per, seq), np.int32),
                "targets": np.zeros((per, seq), np.int32),
                "segment_ids": np.zeros((per, seq), np.int32),
                "positions": np.zeros((per, seq), np.int32),
                "loss_mask": np.zeros((per, seq), np.float32),
            }
            for r in range(per):
                i = lo + first + r
                if i >= len(docs):
                    continue
                doc, n = docs[i], len(docs[i]) - 1
                batch["inputs"][r, :n] = doc[:-1]
                batch["targets"][r, :n] = doc[1:]
                batch["segment_ids"][r, :n] = 1
                batch["positions"][r, :n] = np.arange(n)
                batch["loss_mask"][r, max(starts[i] - 1, 0) : n] = 1.0
            scores = to_host(self._score(params, t.device_batch(batch)))
            out += [float(s) for s in scores[: min(rows, len(docs) - lo)]]
        return out

    # -- metrics -----------------------------------------------------------------------------
    def __call__(self, params: PyTree) -> dict[str, float]:
        data = self.config.data
        n = int(self.config.eval.get("seqio_examples", 0) or 0)
        if n <= 0:
            return {}
        tasks = metric_tasks(data)
        row: dict[str, float] = {}
        try:
            for task in tasks:
                prefix = "seqio/" if task.name == data.task else f"seqio/{task.name}/"
                row.update({prefix + k: v for k, v in self._task_metrics(task, params, n).items()})
        finally:
            if self._decoder is not None:
                self._decoder.params = None  # no second copy of the parameters between evals
        return row

    def _task_metrics(self, task: Any, params: PyTree, n: int) -> dict[str, float]:
        data, model = self.config.data, self.config.model
        keys = document_keys(task)
        ds = quiet_options(task.get_dataset(
            sequence_length=feature_lengths(data, task),
            split=seqio_split(data, "eval"),
            shuffle=False,
            num_epochs=1,
        ))
        limit = min(int(data.seq_len) + 1, int(model.max_seq_len))
        examples, docs, starts = [], [], []
        for ex in ds.take(n).as_numpy_iterator():
            parts = [np.asarray(ex[k], np.int32) for k in keys]
            doc = np.concatenate(parts)
            if len(doc) > limit or len(doc) < 2:
                continue
            examples.append(ex)
            docs.append(doc)
            starts.append(len(parts[0]) if len(keys) == 2 else 1)
        out: dict[str, float] = {"examples": float(len(examples))}
        if not examples:
            return out
        vocab = task.output_features["targets"].vocabulary
        targets = []
        for ex in examples:
            target = ex.get("targets_pretokenized")
            if target is None:
                target = vocab.decode([int(i) for i in ex["targets"]])
            if isinstance(target, bytes):
                target = target.decode("utf-8")
            targets.append(task.postprocess_fn(target, example=ex, is_target=True))
        results: list[dict] = []
        if task.score_metric_fns:
            scores = self._scores(params, docs, starts)
            results += [fn(targets, scores) for fn in task.score_metric_fns]
        if task.predict_metric_fns and "inputs" in keys:
            predictions = self._predict(params, examples, vocab)
            predictions = [
                task.postprocess_fn(p, example=ex, is_target=False)
                for p, ex in zip(predictions, examples)
            ]
            results += [fn(targets, predictions) for fn in task.predict_metric_fns]
        for result in results:
            for name, value in dict(result).items():
                number = _number(value)
                if number is not None:
                    out[str(name)] = number
        return out

    def _predict(self, params: PyTree, examples: list[dict], vocab: Any) -> list[str]:
        decoder = self._decoder_for(params)
        batch = max(1, int(self.config.decode.batch_size))
        texts = []
        for lo in range(0, len(examples), batch):
            chunk = examples[lo : lo + batch]
            prompts = [[int(i) for i in ex["inputs"]] for ex in chunk]
            budget = max(len(ex["targets"]) for ex in chunk)
            budget = min(budget, decoder.max_seq_len - max(map(len, prompts)))
            done = decoder.generate(prompts, SamplingParams(), max(budget, 1), batch_size=batch)
            # each example's own budget, its targets' length (greedy rows are independent)
            texts += [vocab.decode(c.tokens[: len(ex["targets"])]) for c, ex in zip(done, chunk)]
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
