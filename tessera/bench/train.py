"""Training throughput: tokens/s (the task's unit), TFLOP/s per device and MFU against the peak of
this device (n/a for a model that cannot count its FLOPs).

On CPU the peak is a float32 matmul probe measured in the same run, so the ratio is meaningful
on a shared, noisy machine.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax

from tessera.bench.table import print_table
from tessera.configs import load_config
from tessera.train import flops as flops_lib
from tessera.train.trainer import Trainer


def run_train_bench(config_spec: str, overrides: Mapping[str, Any] | None = None,
                    steps: int = 5, devices: list | None = None) -> list[dict]:
    """Time ``steps`` train steps after one compile step; print and return one table row."""
    cfg = load_config(config_spec, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, workdir, devices)
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
        step_s = (time.perf_counter() - t0) / steps
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
