"""Input pipeline throughput per host against what the train step consumes.

``run_data_bench`` builds the task's train pipeline as the trainer does
(``trainer.task.make_data("train", process_index=0, process_count=P)``: process 0 of a P-process
job, whose per-host batch is ``global_batch_size / P`` rows; ``setup (s)`` is that call), then
times its first batch and ``rounds`` x ``batches`` more. With several packings (``data.packing``;
``first_fit:W`` also sets ``data.pack_window=W``) each gets its own pipeline and the rounds
alternate between them, so a noisy machine slows them alike.

Rates are totals over all the batches, the first included (``1st batch (s)`` also shows it
alone), not a best or median round: a first-fit packer's batches are bursty (a batch that reads
a window of documents, then batches served from it), so only a span of several windows gives its
rate, and its first window is real work. A window read near the end may be partly used, which
makes the rate low by up to one window per stream in the span; the bench prints a note when a
stream read fewer than 4 windows.

Per host, from the batches (rows of ``seq_len`` input slots):

- ``docs/s``: documents started, counted as the real tokens equal to the tokenizer's BOS (every
  document is ``[bos] + text + [eos]`` and ``encode`` never emits BOS), or its EOS when it has no
  BOS (documents ended). The row's last token, which only ``targets`` holds, is counted too
  (real when ``loss_mask`` says it continues a piece or it is not the pad id, so a one-token
  piece made only of that marker at a row's end is missed when the pad id equals it).
- ``rows/s``, ``slots/s`` (rows x seq_len), ``tokens/s`` (real tokens: ``segment_ids != 0``) and
  ``efficiency`` (tokens / slots: ``data/packing.py: packing_efficiency`` of all timed
  batches).
- ``batch (ms)``: the mean time per batch; every rate is a count over the same total time, so
  ``tokens/s = efficiency x slots/s`` and ``slots/s = rows/s x seq_len`` hold exactly.

The step's need per host is the slots it consumes: ``global_batch_size x seq_len / P / step
time``, from a train step measured in the same run (``bench/train.py: time_train_step``), or from
``step_tokens_per_s``, the job's train tokens/s as ``bench train`` and ``tessera.aot`` count them
(batch x seq_len a step, padding included), divided by P. ``headroom`` is ``slots/s`` over that
(a step consumes whole rows, padding included), the same as step time / batch time: below 1 the
input would starve the step.

A measured step runs on this machine with the global batch, so with ``P > 1`` it stands for a
job whose step takes as long as it does here; for a pod, give ``step_tokens_per_s``. On a CPU the
pipeline and the step share the cores; on an accelerator host the pipeline runs beside the step.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from tessera.bench.table import print_table
from tessera.bench.train import time_train_step
from tessera.configs import load_config
from tessera.data.pipeline import pack_window, packing_name, stream_layout
from tessera.train.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class BatchCounts:
    """What a batch (or several, summed) holds: rows, input slots, real tokens, documents."""

    rows: int
    slots: int
    tokens: int
    documents: int

    def __add__(self, other: BatchCounts) -> BatchCounts:
        return BatchCounts(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                    dataclasses.astuple(other))))


def count_batch(batch: Mapping[str, np.ndarray], *, marker: int, pad_id: int) -> BatchCounts:
    """Counts of an LM batch (``data/pipeline.py`` layout). ``documents``: real tokens equal to
    ``marker`` (the tokenizer's BOS, else its EOS) over each row's inputs and its last target,
    which is real when ``loss_mask`` continues a piece there or it is not ``pad_id``."""
    segment_ids = np.asarray(batch["segment_ids"])
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [rows, seq_len], got shape {segment_ids.shape}")
    inputs, last = np.asarray(batch["inputs"]), np.asarray(batch["targets"])[:, -1]
    last_real = (np.asarray(batch["loss_mask"])[:, -1] > 0) | (last != pad_id)
    docs = np.count_nonzero((inputs == marker) & (segment_ids != 0))
    docs += np.count_nonzero((last == marker) & last_real)
    real = np.count_nonzero(segment_ids)
    return BatchCounts(segment_ids.shape[0], segment_ids.size, int(real), int(docs))


@dataclasses.dataclass(frozen=True)
class PipelineTiming:
    """One pipeline's measurement: the first batch's time, and the time and counts of all its
    ``batches`` batches, the first included."""

    first_s: float
    total_s: float
    batches: int
    counts: BatchCounts

    @property
    def batch_s(self) -> float:
        """Mean time per batch."""
        return self.total_s / self.batches

    def per_s(self, count: int) -> float:
        """A count summed over the batches, per second of their total time."""
        return count / self.total_s


def time_pipelines(
    pipelines: Mapping[str, Iterator[dict[str, np.ndarray]]],
    *,
    batches: int,
    rounds: int,
    count: Callable[[dict[str, np.ndarray]], BatchCounts],
) -> dict[str, PipelineTiming]:
    """Times each of ``pipelines`` (name -> batch iterator): its first batch, then ``rounds``
    rounds in which every pipeline in turn yields ``batches`` batches; each pipeline's totals
    include its first batch. ``count(batch)`` runs outside the timed calls."""
    if batches < 1 or rounds < 1:
        raise ValueError(f"batches and rounds must be >= 1, got {batches} and {rounds}")
    first = {name: 0.0 for name in pipelines}
    total = {name: 0.0 for name in pipelines}
    counts = {name: BatchCounts(0, 0, 0, 0) for name in pipelines}

    def pull(name: str) -> float:
        t0 = time.perf_counter()
        batch = next(pipelines[name])
        elapsed = time.perf_counter() - t0
        total[name] += elapsed
        counts[name] += count(batch)
        return elapsed

    for name in pipelines:
        first[name] = pull(name)
    for _ in range(rounds):
        for name in pipelines:
            for _ in range(batches):
                pull(name)
    return {
        name: PipelineTiming(first[name], total[name], 1 + batches * rounds, counts[name])
        for name in pipelines
    }


def verdict(headroom: float, batch_s: float, step_s: float | None) -> str:
    """The line that says whether the input keeps up with the step (``headroom`` >= 1)."""
    if headroom >= 1:
        return f"input keeps up ({headroom:.1f}x the step's need)"
    times = "" if step_s is None else \
        f"; a batch takes {1e3 * batch_s:.3g} ms, a step {1e3 * step_s:.3g} ms"
    return (f"input would starve the step: it makes {headroom:.2f}x the slots/s the step "
            f"consumes per host{times}")


def run_data_bench(
    config_spec: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    batches: int = 50,
    rounds: int = 3,
    processes: int | None = None,
    packings: Sequence[str] | None = None,
    step_tokens_per_s: float | None = None,
    measure_step: bool = True,
    steps: int = 3,
    devices: list | None = None,
) -> list[dict]:
    """Measures the train pipeline of ``config_spec`` as process 0 of ``processes`` (default
    ``jax.process_count()``), once per ``data.packing`` in ``packings`` (default: the config's),
    against the step's need per host: ``step_tokens_per_s`` (the job's, divided by the process
    count) when given, else a step measured here (``steps`` after a compile) when
    ``measure_step``, else none. Prints the table and a verdict per row; returns the rows."""
    overrides = dict(overrides or {})
    processes = jax.process_count() if processes is None else processes
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if step_tokens_per_s is not None and step_tokens_per_s <= 0:
        raise ValueError(f"step_tokens_per_s must be > 0, got {step_tokens_per_s}")
    base = load_config(config_spec, overrides)
    configs = {}
    for spec in packings or [packing_name(base.data)]:
        packing, _, window = spec.partition(":")
        cfg = load_config(config_spec, {
            **overrides, "data.packing": packing, **({"data.pack_window": window} if window else {})
        })
        name = packing_name(cfg.data)
        if name in configs:
            raise ValueError(f"packings repeat {name}: {','.join(packings or [])}")
        configs[name] = cfg
    names = list(configs)
    with tempfile.TemporaryDirectory() as workdir:
        trainers = {name: Trainer(cfg, workdir, devices) for name, cfg in configs.items()}
        for trainer in trainers.values():
            if trainer.task.throughput_unit()[0] != "tokens":
                raise ValueError(
                    f"bench data measures token pipelines; {config_spec} trains task "
                    f"{trainer.task.name}, which counts {trainer.task.throughput_unit()[0]}"
                )
        pipelines, setup_s = {}, {}
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            pipelines[name] = trainer.task.make_data(
                "train", process_index=0, process_count=processes
            )
            setup_s[name] = time.perf_counter() - t0
        tokenizer = trainers[names[0]].task.tokenizer
        marker = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
        timings = time_pipelines(
            pipelines, batches=batches, rounds=rounds,
            count=lambda b: count_batch(b, marker=marker, pad_id=tokenizer.pad_id),
        )
        step_s = None
        if step_tokens_per_s is None and measure_step:
            step = time_train_step(trainers[names[0]], steps)
            step_tokens_per_s, step_s = step.units_per_s, step.step_s
    per_host = None if step_tokens_per_s is None else step_tokens_per_s / processes
    seq_len = base.data.seq_len
    rows, verdicts = [], []
    for name in names:
        t = timings[name]
        c = t.counts
        row = {
            "config": config_spec,
            "packing": name,
            "processes": processes,
            "rows/batch": c.rows // t.batches,
            "setup (s)": setup_s[name],
            "1st batch (s)": t.first_s,
            "batch (ms)": 1e3 * t.batch_s,
            "docs/s": t.per_s(c.documents),
            "rows/s": t.per_s(c.rows),
            "tokens/s": t.per_s(c.tokens),
            "slots/s": t.per_s(c.slots),
            "efficiency": c.tokens / c.slots,
        }
        if per_host is not None:
            row["step slots/s/host"] = per_host
            row["headroom"] = row["slots/s"] / per_host
            verdicts.append(f"{config_spec} {name}: {verdict(row['headroom'], t.batch_s, step_s)}")
        rows.append(row)
    source = "no step (--no_step)" if per_host is None else (
        f"step measured here ({steps} steps after compile)" if step_s is not None
        else "step tokens/s given")
    print_table(rows, title=(
        f"input pipeline per host (seq_len {seq_len}; 1 + {rounds} x {batches} batches each, "
        f"rounds alternating, rates over all; {source})"
    ))
    for line in [*verdicts, *_window_notes(configs, timings, processes)]:
        print(line)
    return rows


def _window_notes(
    configs: Mapping[str, Any], timings: Mapping[str, PipelineTiming], processes: int
) -> list[str]:
    """A note per first-fit packing whose streams each read fewer than 4 windows."""
    notes = []
    for name, cfg in configs.items():
        if not name.startswith("first_fit"):
            continue
        streams, _ = stream_layout(cfg.data, global_batch_size=cfg.data.global_batch_size,
                                   process_index=0, process_count=processes)
        windows = timings[name].counts.documents / (streams // processes) / pack_window(cfg.data)
        if windows < 4:
            notes.append(
                f"note: {name}: each stream read about {windows:.1f} windows of documents; a "
                "window read near the end may be partly used, so its rates may be low by up "
                f"to {min(1.0, 1 / max(windows, 1e-9)):.0%}: raise --batches"
            )
    return notes
