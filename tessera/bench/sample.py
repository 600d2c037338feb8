"""``python -m tessera.bench sample --config=ldm:tiny --workdir=DIR [--judge=vit:tiny@VITDIR]``.

Per sampler setting (``--samplers=ddim:20,dpmpp_2m:10`` x ``--guidances=1,4``) it samples
``--num_images`` images of the classes in turn from the workdir's checkpoint and prints the
sampling speed (images/s, timed after a warm-up that compiles the step) and, with a judge (an
image classifier's config and workdir, e.g. the ``vit:tiny`` trained on the same set), the share
of images the judge assigns to the class they were sampled for, against chance.

``--flops_only``: no workdir; the denoiser's analytic forward FLOPs per evaluation for each
``--config`` (U-Nets with a 1-token class context and with SD's 77-token text context; and the
multiply-adds without the attention score matmuls, the convention of the 759 "GFLOPs"
published for SD 2.1 at 4 x 96 x 96).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tessera.bench.table import print_table
from tessera.configs import load_config

SD21_PUBLISHED_GFLOPS = 759.0  # per U-Net evaluation, 4 x 96 x 96 latents, 77 text tokens
SD_TEXT_TOKENS = 77


def parse_samplers(text: str) -> list[tuple[str, int]]:
    """``"ddim:20,dpmpp_2m:10"`` -> ``[("ddim", 20), ("dpmpp_2m", 10)]``."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, steps = item.partition(":")
        if not sep or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"--samplers entry {item!r} is not sampler:steps (e.g. ddim:20)")
        out.append((name, int(steps)))
    if not out:
        raise ValueError("--samplers names no sampler")
    return out


def denoiser_flops(model: Any, context_len: int = 1) -> float:
    """Analytic forward FLOPs of one denoiser evaluation of one image."""
    if model.name == "unet":
        from tessera.models.unet import flops_per_example

        return flops_per_example(model, context_len=context_len)
    if model.name == "dit":
        from tessera.models.dit import flops_per_example

        return flops_per_example(model)
    raise ValueError(f"model.name={model.name!r} is not a diffusion denoiser (unet, dit)")


def run_flops_table(specs: Sequence[str], overrides: Mapping[str, Any]) -> None:
    rows = []
    for spec in specs:
        m = load_config(spec, overrides).model
        row = {
            "config": spec,
            "model": m.name,
            "latent": f"{m.num_channels}x{m.image_size}x{m.image_size}",
            "GFLOPs/eval": denoiser_flops(m) / 1e9,
        }
        if m.name == "unet":
            from tessera.models.unet import flops_per_example

            row["GFLOPs/eval, 77 text tokens"] = denoiser_flops(m, SD_TEXT_TOKENS) / 1e9
            # SD 2.1's published figure: multiply-adds without the attention score matmuls
            macs = flops_per_example(m, SD_TEXT_TOKENS, scores=False) / 2e9
            row["G multiply-adds w/o attention scores"] = macs
            row["vs SD 2.1's published 759"] = f"{macs / SD21_PUBLISHED_GFLOPS:.3f}x"
        rows.append(row)
    print_table(rows, "denoiser forward FLOPs per image and evaluation (2 per multiply-add)")


def load_judge(spec: str) -> Any:
    """``"vit:tiny@WORKDIR"`` -> a function uint8 images [N, H, W, 3] -> predicted classes."""
    import jax
    from flax import nnx

    from tessera.models.create import ModelSpec
    from tessera.serve.loading import restore_params
    from tessera.sharding import make_mesh, make_rules

    config_spec, sep, workdir = spec.rpartition("@")
    if not sep or not config_spec or not workdir:
        raise ValueError(f"--judge={spec!r} is not CONFIG@WORKDIR (e.g. vit:tiny@/tmp/vit)")
    config = load_config(config_spec)
    if config.model.name != "vit":
        raise ValueError(f"--judge config {config_spec} is not an image classifier (vit)")
    config.mesh.update(data=1, fsdp=1, expert=1, sequence=1, tensor=1)
    mesh = make_mesh(config.mesh, jax.local_devices()[:1])
    spec_ = ModelSpec(config.model)
    _, params = restore_params(spec_, workdir, spec_.shardings(mesh, make_rules("")))
    model = spec_.merge(params)
    size = config.model.image_size
    logits = nnx.jit(lambda vit, x: vit(x).logits.argmax(-1))  # parameters as arguments

    def forward(x):
        return logits(model, x)

    def classify(images: np.ndarray) -> np.ndarray:
        if images.shape[1:3] != (size, size):
            raise ValueError(f"judge {config_spec} takes {size}x{size} images, got "
                             f"{images.shape[1]}x{images.shape[2]}")
        return np.asarray(forward(images.astype(np.float32) / 127.5 - 1.0))

    return classify


def run_sample_bench(
    spec: str,
    overrides: Mapping[str, Any],
    *,
    workdir: str,
    samplers: Sequence[tuple[str, int]],
    guidances: Sequence[float],
    num_images: int,
    judge: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
) -> list[dict]:
    from tessera.serve.images import class_labels, generate, load_denoiser

    config = load_config(spec, overrides)
    denoiser = load_denoiser(config, workdir)
    m = config.model
    labels = class_labels(num_images, -1, m.num_classes)
    classify = load_judge(judge) if judge else None
    flops = denoiser_flops(m)
    rows = []
    for sampler, steps in samplers:
        for guidance in guidances:
            kw = dict(sampler=sampler, steps=steps, guidance=guidance, seed=seed)
            size = batch_size or num_images
            generate(denoiser, labels[:size], batch_size=size, **{**kw, "steps": 1})  # compile
            start = time.perf_counter()
            images = generate(denoiser, labels, batch_size=size, **kw)
            seconds = time.perf_counter() - start
            evals = steps * (1 if guidance == 1 else 2)
            row = {
                "sampler": sampler,
                "steps": steps,
                "guidance": guidance,
                "images/s": num_images / seconds,
                "GFLOP/image": flops * evals / 1e9,
            }
            if classify is not None:
                hits = classify(images) == labels
                row["judged as requested"] = f"{hits.mean():.3f}"
                row["chance"] = f"{1 / m.num_classes:.3f}"
            rows.append(row)
    ema = " (EMA weights)" if denoiser.ema else ""
    print_table(
        rows,
        f"{spec}: sampling {num_images} images from step {denoiser.step} of {workdir}{ema}",
    )
    return rows
