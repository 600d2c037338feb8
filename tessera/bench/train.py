"""Training throughput: tokens/s (the task's unit), TFLOP/s per device and MFU against the peak of
this device (n/a for a model that cannot count its FLOPs).

On CPU the peak is a float32 matmul probe measured in the same run, so the ratio is meaningful
on a shared, noisy machine.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax

from tessera.bench.table import print_table
from tessera.configs import load_config
from tessera.train import flops as flops_lib
from tessera.train.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """A measured train step: ``trainer`` (its config, task and ``throughput``), the first step
    with its compile (``compile_s``) and the mean of the timed steps after it (``step_s``)."""

    trainer: Trainer
    compile_s: float
    step_s: float

    @property
    def units_per_s(self) -> float:
        """The task's throughput units (tokens: batch x seq_len slots) per second, all devices."""
        return self.trainer.throughput[1] / self.step_s


def time_train_step(trainer: Trainer, steps: int = 5) -> StepTiming:
    """Times ``steps`` train steps of ``trainer`` on its task's train batches (process 0 of 1),
    after one step that compiles; the batches are built before timing."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    state = trainer.init_state()
    data = trainer.task.make_data("train")
    batches = [trainer.device_batch(next(data)) for _ in range(steps + 1)]
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for batch in batches[1:]:
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    return StepTiming(trainer, compile_s, (time.perf_counter() - t0) / steps)


def run_train_bench(config_spec: str, overrides: Mapping[str, Any] | None = None,
                    steps: int = 5, devices: list | None = None) -> list[dict]:
    """Time ``steps`` train steps after one compile step; print and return one table row."""
    cfg = load_config(config_spec, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        timing = time_train_step(Trainer(cfg, workdir, devices), steps)
    trainer, compile_s, step_s = timing.trainer, timing.compile_s, timing.step_s
    peak, source = flops_lib.peak_flops_per_device()
    n_dev = trainer.mesh.devices.size
    unit, per_step = trainer.throughput
    flops = trainer.flops_per_step
    tflops = float("nan") if flops is None else flops / step_s / n_dev / 1e12
    row = {
        "config": config_spec,
        "params (M)": trainer.spec.num_params() / 1e6,
        "devices": f"{n_dev}x {jax.devices()[0].device_kind}",
        "dtype": cfg.model.dtype,
        f"{unit}/step": per_step,
        "compile+1st (s)": compile_s,
        "step (s)": step_s,
        f"{unit}/s": per_step / step_s,
        "TFLOP/s/dev": tflops,
        "peak TFLOP/s/dev": peak / 1e12,
        "peak from": source,
        "MFU": "n/a" if flops is None else f"{100 * tflops * 1e12 / peak:.1f}%",
    }
    print_table([row], title=f"train throughput ({steps} steps after compile)")
    return [row]
