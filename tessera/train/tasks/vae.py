"""``vae``: train a KL autoencoder (``model.name="vae"``) to reconstruct images.

Batches come from the image pipeline (``data.source`` shapes | image_folder | npz |
array_record, ``data/image_pipeline.py``): ``images`` float32 [B, H, W, C] in [-1, 1] and
``label`` int32 [B] (unused, except that padding rows of an eval batch have label -1 and weight
0). The model is called as ``model(images, rng=rng, train=train)``: training decodes a posterior
sample, evaluation the posterior mean.

Loss per image, each term a mean over its elements (so it does not grow with the image size):

    rec  = mean over H x W x C of |x - x_hat|                  (L1, SD's choice; or "mse":
                                                                 squared error, model.vae.
                                                                 reconstruction_loss)
    kl   = mean over h x w x Z of 0.5 (mu^2 + var - 1 - logvar)  (KL(q(z|x) || N(0, 1)))
    loss = rec + model.vae.kl_weight * kl

summed over the real images of the batch; the weight is their number, so the logged loss is the
per-image mean. Stable Diffusion's loss sums both terms over their elements instead: its
kl_weight k corresponds to k * (H W C) / (h w Z) here (x 48 for RGB at f = 8, 4 channels).
Metric sums: ``rec_loss``, ``kl`` and ``psnr`` (dB, of the reconstruction clipped to [-1, 1],
both mapped to [0, 1]). No perceptual (LPIPS) or adversarial term.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tessera.configs.base import ConfigDict
from tessera.data import IMAGE_SOURCES, DataIterator, make_image_pipeline
from tessera.models.vae import flops_per_example
from tessera.train.tasks.base import Batch, Feature, Sums, Task

RECONSTRUCTION_LOSSES = ("l1", "mse")


def vae_loss(
    images: jax.Array,
    reconstruction: jax.Array,
    mean: jax.Array,
    logvar: jax.Array,
    valid: jax.Array,
    *,
    kl_weight: float,
    reconstruction_loss: str = "l1",
) -> tuple[jax.Array, jax.Array, Sums]:
    """(summed loss, number of real images, metric sums) in float32 (module docstring).

    images / reconstruction [B, H, W, C]; mean / logvar [B, h, w, Z]; valid [B] (1: a real
    image, 0: padding)."""
    x, x_hat = images.astype(jnp.float32), reconstruction.astype(jnp.float32)
    err = x_hat - x
    per_pixel = jnp.abs(err) if reconstruction_loss == "l1" else jnp.square(err)
    rec = jnp.mean(per_pixel, axis=(1, 2, 3))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    mse01 = jnp.mean(jnp.square((jnp.clip(x_hat, -1.0, 1.0) - x) / 2.0), axis=(1, 2, 3))
    psnr = -10.0 * jnp.log10(jnp.maximum(mse01, 1e-10))
    loss = rec + kl_weight * kl
    sums = {"rec_loss": jnp.sum(rec * valid), "kl": jnp.sum(kl * valid),
            "psnr": jnp.sum(psnr * valid)}
    return jnp.sum(loss * valid), jnp.sum(valid), sums


class VAETask(Task):
    """Reconstruction + KL training of a VAE on images (module docstring)."""

    name = "vae"

    def __init__(self, config: ConfigDict, workdir: str = ""):
        super().__init__(config, workdir)
        m = config.model
        if m.name != "vae":
            raise ValueError(f"task vae needs model.name='vae', got {m.name!r}")
        if config.data.source not in IMAGE_SOURCES:
            raise ValueError(
                f"task vae reads images: data.source must be one of {', '.join(IMAGE_SOURCES)}, "
                f"got {config.data.source!r}"
            )
        if m.vae.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"model.vae.reconstruction_loss: unknown {m.vae.reconstruction_loss!r}; known: "
                f"{', '.join(RECONSTRUCTION_LOSSES)}"
            )
        if m.vae.kl_weight < 0:
            raise ValueError(f"model.vae.kl_weight={m.vae.kl_weight} must be >= 0")

    def features(self) -> dict[str, Feature]:
        m = self.config.model
        shape = (m.image_size, m.image_size, m.num_channels)
        return {
            "images": Feature(shape, "float32", ("batch", None, None, None)),
            "label": Feature((), "int32", ("batch",)),
        }

    def make_data(
        self, split: str, *, process_index: int = 0, process_count: int = 1
    ) -> DataIterator:
        data = self.data_config(split)
        return make_image_pipeline(
            data,
            global_batch_size=data.global_batch_size,
            image_size=self.config.model.image_size,
            split=split,
            process_index=process_index,
            process_count=process_count,
            seed=data.seed,
        )

    def loss(
        self, model: Any, batch: Batch, rng: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, jax.Array, Sums]:
        out = model(batch["images"], rng=rng, train=train)
        v = self.config.model.vae
        valid = (batch["label"] >= 0).astype(jnp.float32)
        return vae_loss(
            batch["images"], out.reconstruction, out.mean, out.logvar, valid,
            kl_weight=v.kl_weight, reconstruction_loss=v.reconstruction_loss,
        )

    def flops_per_example(self) -> float | None:
        return flops_per_example(self.config.model)

    def throughput_unit(self) -> tuple[str, int]:
        return "images", 1
