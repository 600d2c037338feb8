"""Diffusion "decode": sample images from a trained denoiser (``python -m tessera.serve.sample``
is the command line over this).

``load_denoiser`` restores a ``diffusion`` workdir's checkpoint (its EMA when the run kept one)
and the frozen VAE it was trained on; ``generate`` runs a sampler (``serve/samplers.py``: DDPM,
DDIM, DPM-Solver++ (2M), Euler) with classifier-free guidance from seeded noise and decodes the
result to uint8 RGB images; ``image_grid`` / ``write_grid`` tile them into one PNG. The same seed,
labels and settings give the same images.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from tessera.configs.base import ConfigDict
from tessera.models.schedule import NoiseSchedule
from tessera.serve.samplers import classifier_free_guidance, sample
from tessera.train.tasks.diffusion import DENOISERS, load_vae

PyTree = Any


@dataclasses.dataclass
class Denoiser:
    """A trained denoiser ready to sample: its config, model (parameters merged), the noise
    schedule it was trained with, the frozen VAE (None: pixel space) and the checkpoint read."""

    config: ConfigDict
    model: Any
    schedule: NoiseSchedule
    vae: Any | None
    step: int
    ema: bool


def load_denoiser(
    config: ConfigDict, workdir: str, *, step: int | None = None, ema: bool | None = None
) -> Denoiser:
    """The denoiser of ``workdir``'s checkpoint ``step`` (default: the latest) on this process's
    first device. ``ema``: read the parameters' moving average (default: when the config keeps
    one, ``train.ema_decay > 0``)."""
    from tessera.models.create import ModelSpec
    from tessera.serve.loading import restore_params
    from tessera.sharding import make_mesh, make_rules

    m = config.model
    if m.name not in DENOISERS:
        raise ValueError(
            f"model.name={m.name!r} is not a diffusion denoiser (one of {', '.join(DENOISERS)})"
        )
    use_ema = config.train.ema_decay > 0 if ema is None else ema
    single = ConfigDict(config.mesh.to_dict())
    single.update(data=1, fsdp=1, expert=1, sequence=1, tensor=1)
    mesh = make_mesh(single, jax.local_devices()[:1])
    spec = ModelSpec(m)
    shardings = spec.shardings(mesh, make_rules(config.mesh.rules))
    key = "ema" if use_ema else "params"
    step, params = restore_params(spec, workdir, shardings, step, key=key)
    vae = load_vae(m.diffusion.vae_workdir)[1] if m.diffusion.vae_workdir else None
    schedule = NoiseSchedule.from_config(m.diffusion)
    return Denoiser(config, spec.merge(params), schedule, vae, step, use_ema)


def class_labels(num_images: int, class_label: int, num_classes: int) -> np.ndarray:
    """int32 [num_images]: ``class_label`` for every image, or (-1) the classes in turn."""
    if class_label >= num_classes or class_label < -1:
        raise ValueError(
            f"class label {class_label} is not a class of this model (0..{num_classes - 1}, or "
            "-1 for each class in turn)"
        )
    if class_label >= 0:
        return np.full((num_images,), class_label, np.int32)
    return (np.arange(num_images) % num_classes).astype(np.int32)


def generate(
    denoiser: Denoiser,
    labels: Sequence[int] | np.ndarray,
    *,
    sampler: str,
    steps: int,
    guidance: float = 1.0,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """uint8 [N, H, W, 3] images of the classes ``labels`` (N of them), sampled in batches of
    ``batch_size`` (default: all at once) from noise drawn with ``seed``. ``guidance``:
    classifier-free guidance scale (1: conditional only)."""
    m = denoiser.config.model
    labels = np.asarray(labels, np.int32)
    if labels.ndim != 1 or not len(labels):
        raise ValueError("generate needs a non-empty list of class labels")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    n = len(labels)
    size = batch_size or n
    shape = (m.image_size, m.image_size, m.num_channels)
    # A pytree, so the sampler's jitted step takes the parameters as arguments (a closure would
    # bake them into the program as constants) and compiles once per batch shape.
    graphdef, state = nnx.split(denoiser.model)
    apply = jax.tree_util.Partial(_apply_denoiser, graphdef, m.num_channels, state)
    decode = nnx.jit(lambda vae, z: vae.from_latents(z))
    # Image i starts from noise keyed by (seed, i), whatever the batching; a stochastic
    # sampler's per-step noise is keyed by (seed, first image of the batch).
    root = jax.random.key(seed)
    noise_keys = jax.random.split(jax.random.fold_in(root, 0), n)
    step_root = jax.random.fold_in(root, 1)
    out = []
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        x_T = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(noise_keys[rows])
        fn = classifier_free_guidance(apply, jnp.asarray(labels[rows]), m.num_classes, guidance)
        x0 = sample(
            fn, x_T, jax.random.fold_in(step_root, start), schedule=denoiser.schedule,
            sampler=sampler, steps=steps, eta=eta, progress=progress,
        )
        pixels = x0 if denoiser.vae is None else decode(denoiser.vae, x0)
        out.append(to_uint8(np.asarray(pixels)))
    return np.concatenate(out)


def _apply_denoiser(graphdef: Any, channels: int, state: Any, x: jax.Array, t: jax.Array,
                    labels: jax.Array) -> jax.Array:
    """The denoiser's prediction for x_t (its first ``channels`` output channels: a learned
    variance, DiT's ``learn_sigma``, is not used by the samplers)."""
    return nnx.merge(graphdef, state)(x, t, labels=labels)[..., :channels]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float images in [-1, 1] (clipped) -> uint8 [0, 255]."""
    return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 image of ceil(N / columns) rows (default columns:
    ceil(sqrt(N))) with ``pad`` white pixels between and around the tiles."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((pad + rows * (h + pad), pad + columns * (w + pad), c), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def write_grid(images: np.ndarray, path: str, *, columns: int | None = None,
               scale: int = 1) -> None:
    """Write ``image_grid(images)`` as a PNG, each pixel ``scale`` x ``scale`` (nearest), via a
    temporary file renamed into place (an interrupted run leaves no half-written file)."""
    grid = Image.fromarray(image_grid(images, columns))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
