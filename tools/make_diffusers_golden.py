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


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn anew from ``seed``, so a wrong mapping cannot hide behind zero
    biases or unit norms: norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), weights
    N(0, 1 / fan_in) (activations keep their scale through the network)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                is_scale = "norm" in name and name.endswith("weight")
                p.copy_(1.0 + 0.1 * noise if is_scale else 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


@golden("vae")
def vae(out_dir: str) -> None:
    """A tiny ``AutoencoderKL`` (levels of 8 and 16 channels, f = 2, 2 resnets a level, 4 groups,
    mid-block attention, SD's scaling factor and null shift), every weight random. Arrays:
    ``images`` [2, 16, 16, 3] in [-1, 1]; the encoder's ``mean`` and ``logvar`` [2, 8, 8, 4];
    ``latents`` [2, 8, 8, 4] (unscaled z) and their ``decoded`` images [2, 16, 16, 3]."""
    model = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    randomize(model, seed=1)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand((2, 3, 16, 16), generator=gen) * 2 - 1
    latents = torch.randn((2, 4, 8, 8), generator=gen)
    with torch.no_grad():
        posterior = model.encode(images).latent_dist
        decoded = model.decode(latents).sample
    save_model(model, out_dir)
    save_reference(
        out_dir,
        images=nhwc(images),
        mean=nhwc(posterior.mean),
        logvar=nhwc(posterior.logvar),
        latents=nhwc(latents),
        decoded=nhwc(decoded),
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
