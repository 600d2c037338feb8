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


def randomize(model: torch.nn.Module, norm_std: float = 0.2) -> None:
    """Every parameter random (seeded by the caller): weights ~ N(0, 1 / fan_in) so activations
    stay O(1), biases ~ N(0, norm_std^2), norm scales ~ 1 + N(0, norm_std^2). diffusers starts
    some outputs and all norm affines at constants, which would hide layout errors."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + norm_std * torch.randn_like(p))
            else:
                p.copy_(norm_std * torch.randn_like(p))


def unet_golden(out_dir: str, **config) -> None:
    """A tiny random ``UNet2DConditionModel`` (``config``: its settings on top of 8 x 8 x 4
    latents, 1 layer per block, GroupNorm over 4 groups, 8-wide context). reference.npz:
    ``sample`` [2, 8, 8, 4] (NHWC), ``timesteps`` int32 [2], ``encoder_hidden_states``
    [2, 5, 8], ``output`` [2, 8, 8, 4] (NHWC)."""
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=8, **config,
    )
    model = diffusers.UNet2DConditionModel(**config).eval()
    randomize(model)
    sample = torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([37, 981])
    context = torch.randn(2, 5, 8)
    with torch.no_grad():
        output = model(sample, timesteps, encoder_hidden_states=context).sample
    save_model(model, out_dir)
    save_reference(
        out_dir, sample=nhwc(sample), timesteps=timesteps.numpy().astype(np.int32),
        encoder_hidden_states=context.numpy(), output=nhwc(output),
    )


@golden("unet")
def unet(out_dir: str) -> None:
    """Attention on the second (last) level, linear proj_in / proj_out (SD 2's), per-level
    heads in ``attention_head_dim`` (diffusers' naming quirk). See ``unet_golden``."""
    unet_golden(
        out_dir, block_out_channels=(8, 16), attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
    )


@golden("unet_conv")
def unet_conv(out_dir: str) -> None:
    """SD 1's layout: attention on the first level, two transformer layers, 1x1-conv
    proj_in / proj_out, one head count for every level, sin-before-cos features with a
    frequency shift. See ``unet_golden``."""
    unet_golden(
        out_dir, block_out_channels=(8, 16), attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=False,
        transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1,
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
