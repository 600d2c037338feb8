"""Metric sinks: ``WORKDIR/metrics.jsonl`` (one JSON object a line) and TensorBoard.

Train rows are ``{"step": s, "loss": ..., ...}`` (TensorBoard tags ``train/<key>``); eval rows are
separate, ``{"step": s, "eval/loss": ..., "eval/<metric>": ...}`` (tags as written), told apart
by their ``eval/loss``. Per-layer statistics become one value per layer (``flatten_metrics``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tessera.files import write_atomic

EVAL_KEY = "eval/loss"  # every eval row has it, no train row does


class MetricsWriter:
    """Append rows ``{"step": s, ...}``; on resume, rows past the restored step are dropped so
    the file reads as one run."""

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        truncate_after: int | None = None,
    ):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if truncate_after is not None and os.path.exists(self.path):
            self._truncate(truncate_after)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate(self, step: int) -> None:
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        write_atomic(self.path, "".join(keep))

    def write(self, step: int, row: dict[str, float]) -> None:
        """A train row."""
        self._append(step, row, {f"train/{k}": v for k, v in row.items()})

    def write_eval(self, step: int, row: dict[str, float]) -> None:
        """An eval row: keys ``eval/...`` (and ``eval_<state>/...``), one of them ``eval/loss``."""
        if EVAL_KEY not in row:
            raise ValueError(f"an eval row needs {EVAL_KEY!r}, got keys {sorted(row)}")
        self._append(step, row, row)

    def _append(self, step: int, row: dict[str, float], tags: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        if self.tb is not None:
            for tag, v in tags.items():
                self.tb.add_scalar(tag, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
    """Rows of ``WORKDIR/metrics.jsonl``: all, or only the ``"train"`` or ``"eval"`` ones."""
    if kind not in (None, "train", "eval"):
        raise ValueError(f"unknown kind of metrics row {kind!r}; known: train, eval")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if kind is None:
        return rows
    return [r for r in rows if (EVAL_KEY in r) == (kind == "eval")]


def flatten_metrics(
    row: Mapping[str, Any], depths: Callable[[str], Sequence[int]]
) -> dict[str, float]:
    """One float per name, as metrics.jsonl and TensorBoard take them: scalars as they are; a
    per-layer statistic ``key`` [layers, ...] (model aux, ``tasks.base.add_aux_losses``) one
    value per layer, named by its depth from ``depths(key)``: ``key/layer_<d>`` for [layers],
    else its max and min over the other axes, ``key_max/layer_<d>`` and ``key_min/layer_<d>``
    (an MoE layer's ``aux/expert_load_max/layer_3``)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        value = np.asarray(value, np.float64)
        if value.ndim == 0:
            out[key] = float(value)
            continue
        layers = depths(key)
        if len(layers) != value.shape[0]:
            raise ValueError(
                f"metric {key!r} has {value.shape[0]} rows for {len(layers)} layers {list(layers)}"
            )
        for depth, v in zip(layers, value):
            if v.ndim == 0:
                out[f"{key}/layer_{depth}"] = float(v)
            else:
                out[f"{key}_max/layer_{depth}"] = float(v.max())
                out[f"{key}_min/layer_{depth}"] = float(v.min())
    return out
