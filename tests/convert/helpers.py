"""Golden fixtures (tests/fixtures/hf, written by tools/make_golden.py) and model runners."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from tessera.convert import Imported, read_hf
from tessera.convert.safetensors_io import SafetensorsReader
from tessera.sharding import use_mesh

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(TESTS, "fixtures", "hf")
NAMES = sorted(n for n in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, n)))
F32 = {"model.dtype": "float32"}


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def reference(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(fixture(name), "reference.npz")))


def read(path: str, devices=None, dtype: str = "float32", **overrides) -> Imported:
    """A float32-compute import on one device (or ``devices``); ``dtype``: the params'."""
    devices = devices if devices is not None else jax.devices()[:1]
    return read_hf(path, dtype=dtype, overrides={**F32, **overrides}, devices=devices)


def forward(model: Imported):
    """A jitted ``tokens [B, T] -> float32 logits [B, T, V]`` on the model's mesh."""

    @jax.jit
    def run(params, tokens):
        with use_mesh(model.mesh, model.rules):
            return model.spec.merge(params)(tokens).logits

    return lambda tokens: np.asarray(run(model.params, np.asarray(tokens, np.int32)))


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
