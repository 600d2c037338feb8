"""Golden fixtures (tests/fixtures/hf, written by tools/make_golden.py) and model runners."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from tessera.convert import Imported, read_hf
from tessera.convert.safetensors_io import SafetensorsReader
from tessera.sharding import use_mesh

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
FIXTURES = os.path.join(TESTS, "fixtures", "hf")
NAMES = sorted(n for n in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, n)))
F32 = {"model.dtype": "float32"}


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def reference(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(fixture(name), "reference.npz")))


# Decoder LMs: references of tokens (and a greedy path); the others are image classifiers.
LM_NAMES = [n for n in NAMES if "tokens" in np.load(os.path.join(fixture(n), "reference.npz"))]


def nhwc(pixel_values: np.ndarray) -> np.ndarray:
    """HF's ``pixel_values`` [B, C, H, W] as the images tessera takes, [B, H, W, C]."""
    return np.ascontiguousarray(pixel_values.transpose(0, 2, 3, 1))


def read(path: str, devices=None, dtype: str = "float32", **overrides) -> Imported:
    """A float32-compute import on one device (or ``devices``); ``dtype``: the params'."""
    devices = devices if devices is not None else jax.devices()[:1]
    return read_hf(path, dtype=dtype, overrides={**F32, **overrides}, devices=devices)


def forward(model: Imported):
    """A jitted ``inputs -> float32 logits`` on the model's mesh: tokens int32 [B, T] ->
    [B, T, V] for LMs, images float32 [B, H, W, C] -> [B, K] for classifiers."""

    @jax.jit
    def run(params, inputs):
        with use_mesh(model.mesh, model.rules):
            return model.spec.merge(params)(inputs).logits

    return lambda inputs: np.asarray(run(model.params, np.asarray(inputs)))


def greedy(logits_fn, prompt: np.ndarray, steps: int, width: int) -> list[int]:
    """Greedy continuation by full forward passes of one fixed-shape [2, width] batch (the
    model is causal, so the padding after the sequence does not change its logits)."""
    seq = [int(t) for t in prompt]
    for _ in range(steps):
        row = np.zeros((2, width), np.int32)
        row[0, : len(seq)] = seq
        seq.append(int(np.argmax(logits_fn(row)[0, len(seq) - 1])))
    return seq[len(prompt) :]


def copy_fixture(name: str, dst: str) -> str:
    shutil.copytree(fixture(name), dst)
    return dst


def hf_tensors(path: str) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(path)
    return {n: np.array(reader.get(n)) for n in reader.names}


def edit_config(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m tessera.convert ARGS`` on the CPU, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "tessera.convert", *args],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
        capture_output=True, text=True, timeout=300,
    )
