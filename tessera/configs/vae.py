"""KL autoencoder (``model.name = "vae"``, task ``vae``), the first stage of latent diffusion:
``tiny`` trains on the embedded shapes images on CPU; ``sd`` is Stable Diffusion's f8 VAE
(``AutoencoderKL``, 4 latent channels) on an image folder.

The loss is the per-pixel reconstruction error (L1 as SD, or squared) plus
``model.vae.kl_weight`` times the KL to N(0, 1), both means over their elements
(``train/tasks/vae.py``); no perceptual or adversarial term.
"""

from tessera.configs.base import ConfigDict, make_get_config


def _vae(c: ConfigDict, *, image_size: int, **vae) -> None:
    """What every VAE preset shares, plus ``vae``'s own fields."""
    c.model.update(name="vae", family="AutoencoderKL", image_size=image_size, num_channels=3)
    c.model.vae.update(**vae)
    c.train.task = "vae"


def _tiny(c: ConfigDict) -> None:
    """32 x 32 shapes images (``data.source="shapes"``, as ``vit:tiny``) to 8 x 8 x 4 latents
    (f = 4): three levels of 32 / 64 / 64 channels, one ResNet block each (0.95M parameters).
    One group per GroupNorm and a squared-error loss: with 8 groups (each normalised on its
    own, which hides an image's colours from the next layer) and L1, 300 steps reach 14.9 dB
    PSNR on held-out images instead of 17.8 dB. scaling_factor: 1 / the std of the posterior
    means after those 300 steps (2.4), as SD's 0.18215 was measured."""
    _vae(
        c,
        image_size=32,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_groups=1,
        kl_weight=1e-4,
        reconstruction_loss="mse",
        scaling_factor=0.4,
    )
    c.model.dtype = "float32"  # bf16 convolutions are slower than float32 on CPU
    c.data.update(source="shapes", global_batch_size=16, augment=False)
    c.optim.update(learning_rate=2e-3, warmup_steps=50, weight_decay=0.0, b2=0.99)
    c.train.update(steps=300, log_every=25)
    c.eval.update(every=100, batches=4)
    c.checkpoint.every = 100


def _sd(c: ConfigDict) -> None:
    """Stable Diffusion's VAE (``AutoencoderKL`` of SD 1.x / 2.x, 84M parameters): levels of
    128 / 256 / 512 / 512 channels, two ResNet blocks each, 32 groups, f = 8, 256 x 256 crops.
    LDM trained it with Adam at 4.5e-6 x batch; here AdamW at 1e-4 with a short warmup.
    kl_weight: SD's 1e-6 on per-example sums is 1e-6 x (3 * 8 * 8 / 4) = 4.8e-5 on this loss's
    means."""
    _vae(
        c,
        image_size=256,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_groups=32,
        kl_weight=4.8e-5,
    )
    c.data.update(source="image_folder", global_batch_size=64)
    c.optim.update(learning_rate=1e-4, warmup_steps=1000, weight_decay=0.0, b2=0.999)
    c.train.steps = 200_000
    c.mesh.update(data=1, fsdp=-1)


get_config = make_get_config({"tiny": _tiny, "sd": _sd})
