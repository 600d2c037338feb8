"""The task contract: everything task-specific the Trainer needs, behind one interface.

A task says how it reads its data (train and eval splits, per process, resumable), what its
batches hold (keys with dtypes, per-example shapes and logical axes), how a batch becomes a loss
and metric sums, how sums become logged metrics, its FLOPs per example, and which extra
parameter-shaped state it keeps (an EMA). The Trainer does the rest the same way for every task:
sharding, the jitted step, gradient accumulation, evaluation, checkpoints and logging.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import ml_collections

from tessera.configs.base import ConfigDict
from tessera.data import DataIterator, Tokenizer, check_vocab, get_tokenizer
from tessera.train.ema import EMA

PyTree = Any
Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Feature:
    """One batch key: per-example ``shape`` and ``dtype``, and the logical ``axes`` of the batched
    array [batch, *shape] (so one more than ``shape``, the first normally ``"batch"``)."""

    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...]

    def __post_init__(self):
        if len(self.axes) != len(self.shape) + 1:
            raise ValueError(
                f"Feature axes {self.axes} must name the batch axis and each of shape {self.shape}"
            )


class ParamState(Protocol):
    """Extra train state with the parameters' tree, shapes and shardings (e.g. ``ema.EMA``),
    updated after every applied optimizer step and checkpointed with the train state."""

    def init(self, params: PyTree) -> PyTree: ...

    def update(self, value: PyTree, params: PyTree) -> PyTree: ...


AUX_PREFIX = "aux/"  # metric names of a model's aux outputs: aux/<key>


def add_aux_losses(total: jax.Array, weight: jax.Array, aux: Mapping) -> tuple[jax.Array, Sums]:
    """Add a model's auxiliary losses to a summed loss and report its aux outputs as metric sums.

    ``aux`` keys ending in ``_loss`` are scalars already weighted by their layer's config and
    summed over layers: the loss gains ``aux * weight`` (so it normalises like the main loss), and
    ``aux/<key>`` holds the same product for logging. Other aux keys are per-layer statistics
    ([layers emitting it, ...]): ``aux/<key>`` holds them times the weight too, so the logged
    value is their weighted mean over micro-batches. The Trainer logs them one value per layer
    and feeds rule-updated parameters (``layers/base.py: RuleUpdate``) from them.
    """
    losses = {k: v for k, v in aux.items() if k.endswith("_loss")}
    aux_total = sum(losses.values(), jnp.float32(0.0))
    sums = {f"{AUX_PREFIX}{k}": jnp.asarray(v, jnp.float32) * weight for k, v in aux.items()}
    return total + aux_total * weight, sums


class Task(abc.ABC):
    """Base class of the tasks in ``TASKS``; ``config`` is the whole config, ``workdir`` the run's
    directory (relative data assets such as ``hf:`` tokenizers are found there)."""

    name: ClassVar[str]

    def __init__(self, config: ConfigDict, workdir: str = ""):
        self.config = config
        self.workdir = workdir

    # -- data ------------------------------------------------------------------------------
    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """``data.tokenizer`` (a relative ``hf:`` / ``spm:`` path is found in the workdir), read on
        first use so that building a Trainer needs no data. A tokenizer with more ids than
        ``model.vocab_size`` is a ValueError here, before the first step (``check_vocab``)."""
        name = self.config.data.tokenizer
        tokenizer = get_tokenizer(name, base_dir=self.workdir, data_cfg=self.config.data)
        vocab_size = self.config.model.get("vocab_size")
        if vocab_size is not None:
            check_vocab(tokenizer, int(vocab_size), name=name)
        return tokenizer

    @abc.abstractmethod
    def features(self) -> dict[str, Feature]:
        """The batch keys the pipeline yields and the loss reads."""

    @abc.abstractmethod
    def make_data(
        self, split: str, *, process_index: int = 0, process_count: int = 1
    ) -> DataIterator:
        """This process's share of ``split`` ("train": shuffled, endless; "eval": in order, once,
        the last batch padded with rows of zero weight), ``global_batch_size // process_count``
        rows a batch."""

    def data_config(self, split: str) -> ConfigDict:
        """``config.data`` for ``split``; the eval split reads ``eval.source`` when it is set."""
        source = self.config.eval.source
        if split != "eval" or not source:
            return self.config.data
        data = ml_collections.ConfigDict(self.config.data.to_dict())
        data.source = source
        return data

    def pipeline_args(self, split: str, process_index: int, process_count: int) -> dict[str, Any]:
        """The keyword arguments every tessera pipeline builder takes for this run and ``split``
        (``data/pipeline.py: make_pipeline`` and the others)."""
        data = self.config.data
        return dict(
            tokenizer=self.tokenizer,
            global_batch_size=data.global_batch_size,
            seq_len=data.seq_len,
            split=split,
            process_index=process_index,
            process_count=process_count,
            seed=data.seed,
            vocab_size=self.config.model.vocab_size,
        )

    # -- loss and metrics ------------------------------------------------------------------
    @abc.abstractmethod
    def loss(
        self, model: Any, batch: Batch, rng: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, jax.Array, Sums]:
        """(summed loss, weight, metric sums) of a batch; sums add up over micro-batches, and the
        Trainer divides the loss by the total weight (tokens, examples, ...). ``train`` is False
        in evaluation: dropout and other train-only noise are off, ``rng`` is still given."""

    def metrics(self, sums: Mapping[str, jax.Array], weight: jax.Array) -> dict[str, jax.Array]:
        """Logged train metrics from summed ones (default: each sum divided by the weight)."""
        return {k: v / weight for k, v in sums.items()}

    def eval_metrics(
        self, sums: Mapping[str, jax.Array], weight: jax.Array
    ) -> dict[str, jax.Array]:
        """Logged eval metrics (``eval/<name>``), from sums over the evaluation's batches."""
        return self.metrics(sums, weight)

    def extra_eval(self, params: PyTree, trainer: Any) -> dict[str, float]:
        """Metrics of the parameters computed outside the jitted eval step (decoding, external
        metric code), logged as ``eval/<name>`` next to the eval loss; the Trainer calls it at
        every evaluation, on every process. Default: none."""
        del params, trainer
        return {}

    # -- cost ------------------------------------------------------------------------------
    def flops_per_example(self) -> float | None:
        """Forward FLOPs of one example (training counts 3x); None: unknown, no TFLOP/s or MFU."""
        return None

    def throughput_unit(self) -> tuple[str, int]:
        """(unit, units per example) of the logged ``<unit>_per_s``."""
        return "examples", 1

    # -- state and summary -----------------------------------------------------------------
    def param_states(self) -> dict[str, ParamState]:
        """Extra parameter-shaped train state by name: an ``ema`` when ``train.ema_decay > 0``."""
        decay = float(self.config.train.ema_decay)
        return {"ema": EMA(decay)} if decay else {}

    def summary(self) -> str | None:
        """An optional note for the end-of-training line."""
        return None
