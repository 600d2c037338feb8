"""Golden files for diffusers parity: tiny random diffusers models and schedulers, and their
reference outputs.

Runs the reference library (torch + diffusers), never the tests: the tests read what this writes
under ``tests/fixtures/diffusers/<name>/``:

  config.json, diffusion_pytorch_model.safetensors   a model as ``save_pretrained`` writes it
                                                    (float32), for the importer
  reference.npz                                     inputs and reference outputs (each golden
                                                    function's docstring lists its arrays;
                                                    images and latents in tessera's NHWC layout)

plus ``tests/fixtures/diffusers/VERSIONS.json`` (torch and diffusers versions). Seeds are fixed,
so a rerun with the same versions writes the same bytes.

Set up a side virtualenv (not the project's):

  PYENV_VERSION=3.11.7 python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 diffusers==0.42.1 transformers==5.23.0 \\
      safetensors numpy

then ``/tmp/hfvenv/bin/python tools/make_diffusers_golden.py`` (all fixtures, or
``--only vae,unet``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import diffusers
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "diffusers")

GOLDENS: dict[str, Callable[[str], None]] = {}


def golden(name: str) -> Callable[[Callable[[str], None]], Callable[[str], None]]:
    """Register ``fn(out_dir)`` as the fixture ``name``."""

    def register(fn: Callable[[str], None]) -> Callable[[str], None]:
        GOLDENS[name] = fn
        return fn

    return register


def nhwc(x: torch.Tensor) -> np.ndarray:
    """torch NCHW -> numpy float32 NHWC (tessera's layout)."""
    return x.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def save_reference(out_dir: str, **arrays: np.ndarray) -> None:
    np.savez(os.path.join(out_dir, "reference.npz"), **arrays)


def save_model(model: torch.nn.Module, out_dir: str) -> None:
    """``save_pretrained`` in float32 safetensors."""
    model.save_pretrained(out_dir, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(GOLDENS)
    unknown = sorted(set(names) - set(GOLDENS))
    if unknown:
        parser.error(f"unknown fixtures {unknown}; known: {sorted(GOLDENS)}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    for name in names:
        out_dir = os.path.join(FIXTURES, name)
        os.makedirs(out_dir, exist_ok=True)
        torch.manual_seed(0)
        np.random.seed(0)
        GOLDENS[name](out_dir)
        print(f"{name}: wrote {sorted(os.listdir(out_dir))}")
    with open(os.path.join(FIXTURES, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
