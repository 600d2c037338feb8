"""Metric sinks: ``WORKDIR/metrics.jsonl`` (one JSON object per log step) and TensorBoard."""

from __future__ import annotations

import json
import os


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
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """Rows of ``WORKDIR/metrics.jsonl``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
