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


def randomise(model: torch.nn.Module, bias_std: float = 0.1) -> None:
    """Every parameter random (diffusers zero-initialises adaLN and output layers, which would
    leave a parity test checking nothing): weights ~ N(0, 1 / fan_in), vectors ~ N(0, bias_std)."""
    with torch.no_grad():
        for p in model.parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else bias_std
            p.copy_(torch.randn_like(p) * std)


@golden("dit")
def dit(out_dir: str) -> None:
    """A tiny ``DiTTransformer2DModel`` (2 layers, 2 heads x 16, 4 -> 8 channels (learned
    sigma), 8 x 8 latents in 2 x 2 patches, 10 classes), every weight random; the conditioning
    embedder that diffusers copies into each block is one set of weights, as in the hub's DiT
    checkpoints. reference.npz: ``sample`` [3, 8, 8, 4] (NHWC), ``timesteps`` int [3],
    ``class_labels`` int [3] (10: the null class), ``output`` [3, 8, 8, 8] (NHWC)."""
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()
    randomise(model)
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    sample = torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 437, 999])
    class_labels = torch.tensor([3, 10, 7])
    with torch.no_grad():
        output = model(sample, timestep=timesteps, class_labels=class_labels).sample
    save_model(model, out_dir)
    save_reference(
        out_dir, sample=nhwc(sample), timesteps=timesteps.numpy(),
        class_labels=class_labels.numpy(), output=nhwc(output),
    )


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
