"""``diffusion``: train a class-conditional denoiser (``model.name`` unet | dit) on latents of a
frozen VAE, or on pixels.

Data: the image sources of ``classify`` (``data/image_pipeline.py``: the embedded shapes set, an
image folder, npz, array_record), images in [-1, 1]. With ``model.diffusion.vae_workdir`` (a
workdir trained with task ``vae``) the pipeline encodes each batch with that VAE's latest
checkpoint (frozen; the posterior mean, so a resumed run sees the same latents) and scales it
(``(z - shift_factor) * scaling_factor``); the denoiser sees ``model.image_size`` latents of
``model.num_channels`` channels, drawn from images ``downsample_factor`` times larger. Without
one it learns the pixels themselves (``model.num_channels`` = 3).

Loss (DDPM's simple objective): for each image a timestep ``t ~ U{0, T-1}`` and noise
``eps ~ N(0, I)`` from the step RNG, ``x_t = add_noise(x_0, eps, t)``, and the mean squared error
between the model's output and ``schedule.target`` (epsilon, v or x_0 by
``model.diffusion.prediction``), averaged over the pixels of each image and summed over real
images (weight: the number of real images; eval padding rows count 0). Classifier-free guidance:
in training each label is replaced by the null class (``num_classes``) with probability
``model.diffusion.cond_dropout``. A model with ``dit.learn_sigma`` outputs twice the channels;
the second half (the learned variance, trained by DiT's variational bound) is not trained here
and the samplers use fixed variances. ``train.ema_decay`` keeps the EMA the sampler reads.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.data import IMAGE_SOURCES, DataIterator, make_image_pipeline
from tessera.models.schedule import NoiseSchedule
from tessera.train.tasks.base import Batch, Feature, Sums, Task

DENOISERS = ("unet", "dit")
LABEL = "label"


class LatentIterator(DataIterator):
    """An image pipeline's batches with ``images`` replaced by ``encode(images)``; its state is
    the image pipeline's (the encoding is a pure function of the batch)."""

    def __init__(self, images: DataIterator, encode: Any):
        super().__init__(images, {"latents": True})
        self._encode = encode

    def __next__(self) -> Batch:
        batch = dict(next(self._parent))
        batch["images"] = np.asarray(self._encode(batch["images"]))
        return batch


def load_vae(workdir: str) -> tuple[ConfigDict, Any]:
    """(config, VAE module with the latest checkpoint's parameters) of a ``vae`` workdir, on
    this process's first device (a frozen encoder / decoder)."""
    from tessera.convert.configs import config_from_json
    from tessera.models.create import ModelSpec
    from tessera.serve.loading import restore_params
    from tessera.sharding import make_mesh, make_rules

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.diffusion.vae_workdir={workdir!r} has no config.json (train a VAE there "
            "first: python -m tessera.train --config=vae:tiny --workdir=...)"
        )
    config = config_from_json(path)
    if config.model.name != "vae":
        raise ValueError(
            f"model.diffusion.vae_workdir={workdir!r} holds model.name={config.model.name!r}, "
            "not a vae"
        )
    config.mesh.update(data=1, fsdp=1, expert=1, sequence=1, tensor=1)
    mesh = make_mesh(config.mesh, jax.local_devices()[:1])
    spec = ModelSpec(config.model)
    rules = make_rules(config.mesh.rules)
    _, params = restore_params(spec, workdir, spec.shardings(mesh, rules))
    return config, spec.merge(params)


class DiffusionTask(Task):
    """Denoising training of a U-Net or DiT (module docstring)."""

    name = "diffusion"

    def __init__(self, config: ConfigDict, workdir: str = ""):
        super().__init__(config, workdir)
        m = config.model
        if m.name not in DENOISERS:
            raise ValueError(
                f"task diffusion needs a denoiser (model.name one of {', '.join(DENOISERS)}), "
                f"got model.name={m.name!r}"
            )
        if m.num_classes <= 0:
            raise ValueError(
                "task diffusion trains class-conditional denoisers: model.num_classes must be "
                f"> 0, got {m.num_classes}"
            )
        if config.data.source not in IMAGE_SOURCES:
            raise ValueError(
                f"task diffusion reads images: data.source must be one of "
                f"{', '.join(IMAGE_SOURCES)}, got {config.data.source!r}"
            )
        if not 0.0 <= m.diffusion.cond_dropout < 1.0:
            raise ValueError(
                f"model.diffusion.cond_dropout must be in [0, 1), got {m.diffusion.cond_dropout}"
            )
        self.schedule = NoiseSchedule.from_config(m.diffusion)

    @functools.cached_property
    def vae(self) -> tuple[ConfigDict, Any] | None:
        """(config, model) of the frozen VAE, or None (pixel space); checked against the
        denoiser's input shape."""
        workdir = self.config.model.diffusion.vae_workdir
        if not workdir:
            return None
        vae_config, vae = load_vae(workdir)
        m, latent = self.config.model, vae_config.model.vae.latent_channels
        if m.num_channels != latent:
            raise ValueError(
                f"model.num_channels={m.num_channels} but the VAE in {workdir} makes "
                f"{latent}-channel latents"
            )
        return vae_config, vae

    def pixel_size(self) -> int:
        """Side of the images the pipeline reads (the latent side times the VAE's factor)."""
        vae = self.vae
        size = self.config.model.image_size
        return size if vae is None else size * vae[1].downsample_factor

    def features(self) -> dict[str, Feature]:
        m = self.config.model
        shape = (m.image_size, m.image_size, m.num_channels)
        return {
            "images": Feature(shape, "float32", ("batch", None, None, None)),
            LABEL: Feature((), "int32", ("batch",)),
        }

    def make_data(
        self, split: str, *, process_index: int = 0, process_count: int = 1
    ) -> DataIterator:
        data, m = self.data_config(split), self.config.model
        images = make_image_pipeline(
            data,
            global_batch_size=data.global_batch_size,
            image_size=self.pixel_size(),
            split=split,
            process_index=process_index,
            process_count=process_count,
            seed=data.seed,
            num_classes=m.num_classes,
        )
        if self.vae is None:
            if m.num_channels != 3:
                raise ValueError(
                    f"model.num_channels={m.num_channels}: without model.diffusion.vae_workdir "
                    "the denoiser learns RGB pixels (3 channels)"
                )
            return images
        vae = self.vae[1]
        to_latents = nnx.jit(lambda model, x: model.to_latents(x))  # parameters as arguments
        return LatentIterator(images, lambda x: to_latents(vae, x))

    def loss(
        self, model: Any, batch: Batch, rng: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, jax.Array, Sums]:
        x0, labels = batch["images"].astype(jnp.float32), batch[LABEL]
        b, channels = x0.shape[0], x0.shape[-1]
        d = self.config.model.diffusion
        t_key, noise_key, drop_key, model_key = jax.random.split(rng, 4)
        t = jax.random.randint(t_key, (b,), 0, d.num_train_timesteps)
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        x_t = self.schedule.add_noise(x0, noise, t)
        null = self.config.model.num_classes
        valid = labels >= 0
        keep = valid
        if train:
            keep = keep & ~jax.random.bernoulli(drop_key, d.cond_dropout, (b,))
        cond = jnp.where(keep, labels, null)
        out = model(x_t, t, labels=cond, rng=model_key, train=train)
        pred = out[..., :channels].astype(jnp.float32)
        target = self.schedule.target(x0, noise, t)
        mse = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
        weight = valid.astype(jnp.float32)
        total = jnp.sum(mse * weight)
        return total, jnp.sum(weight), {"mse": total}

    def flops_per_example(self) -> float | None:
        m = self.config.model
        if m.name == "unet":
            from tessera.models.unet import flops_per_example

            return flops_per_example(m, context_len=1)
        from tessera.models.dit import flops_per_example

        return flops_per_example(m)

    def throughput_unit(self) -> tuple[str, int]:
        return "images", 1
