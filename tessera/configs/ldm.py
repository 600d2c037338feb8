"""Latent diffusion (task ``diffusion``): class-conditional U-Net or DiT denoisers on the latents
of a VAE trained with ``vae.py`` (``model.diffusion.vae_workdir``), or on pixels.

CPU presets, all on the embedded 32 x 32 shapes (6 classes):

  tiny             U-Net on pixels (32 x 32 x 3): trains without a VAE
  tiny_dit         DiT on pixels, 4 x 4 patches (64 tokens)
  tiny_latent      U-Net on the 8 x 8 x 4 latents of ``vae:tiny``
  tiny_dit_latent  DiT on those latents, 2 x 2 patches (16 tokens)

Published shapes (``tessera.aot`` compiles them for TPU topologies):

  sd21     Stable Diffusion 2.1's U-Net (865M parameters) on 4 x 96 x 96 latents of SD's f8 VAE
           (``vae:sd``; 768 px images), v-prediction, scaled-linear betas. SD conditions on
           OpenCLIP text states (77 x 1024); tessera has no text encoder, so this preset is
           class-conditional (1000 classes, one 1024-wide context token per image).
  dit_s2, dit_b2, dit_l2, dit_xl2
           DiT-S/B/L/XL with 2 x 2 patches on 4 x 32 x 32 latents (256 px ImageNet), linear
           betas, 1000 classes; DiT-XL/2 (675M parameters) with the learned-variance output.
"""

from tessera.configs.base import ConfigDict, make_get_config

_SHAPES = 6  # classes of the embedded shapes set
# model.family: the diffusers class an export writes (tessera.convert)
_FAMILIES = {"unet": "UNet2DConditionModel", "dit": "DiTTransformer2DModel"}


def _common(c: ConfigDict, *, name: str, image_size: int, num_channels: int, classes: int) -> None:
    c.model.update(
        name=name,
        family=_FAMILIES[name],
        image_size=image_size,
        num_channels=num_channels,
        num_classes=classes,
    )
    c.train.task = "diffusion"


def _tiny(c: ConfigDict, *, name: str, latent: bool) -> None:
    """What the CPU presets share: float32, DDPM's linear schedule, epsilon prediction, the
    shapes set unaugmented, an EMA of the weights for sampling."""
    _common(c, name=name, image_size=8 if latent else 32, num_channels=4 if latent else 3,
            classes=_SHAPES)
    c.model.update(dtype="float32", init_std=0.02)
    c.model.diffusion.update(
        schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="epsilon", cond_dropout=0.1
    )
    c.data.update(source="shapes", global_batch_size=64, augment=False)
    c.optim.update(
        learning_rate=1e-3, warmup_steps=100, weight_decay=0.0, schedule="constant", b2=0.999
    )
    c.train.update(steps=2000, log_every=50, ema_decay=0.995)
    c.eval.update(every=500, batches=4)
    c.checkpoint.every = 500
    c.decode.update(sampler="ddim", steps=20, guidance=1.0, num_images=16)


def _tiny_unet(c: ConfigDict, *, latent: bool) -> None:
    _tiny(c, name="unet", latent=latent)
    if latent:  # 8 x 8 -> 4 x 4, attention at both
        unet = dict(block_out_channels=(64, 128), attention_levels=(True, True),
                    num_attention_heads=(2, 4), norm_groups=16)
    else:  # 32 -> 16 -> 8, attention at 16 x 16 and 8 x 8
        unet = dict(block_out_channels=(32, 64, 64), attention_levels=(False, True, True),
                    num_attention_heads=(1, 2, 2), norm_groups=8)
    c.model.unet.update(layers_per_block=1, transformer_layers=1, cross_attention_dim=64, **unet)


def _tiny_dit(c: ConfigDict, *, latent: bool) -> None:
    _tiny(c, name="dit", latent=latent)
    c.model.update(
        patch_size=2 if latent else 4,
        d_model=128,
        num_layers=6 if latent else 4,
        num_heads=4,
        num_kv_heads=4,
        head_dim=32,
        mlp_dim=512,
        norm_eps=1e-6,
    )


def _sd21(c: ConfigDict) -> None:
    """SD 2.1 (768-v): the U-Net shape of ``stabilityai/stable-diffusion-2-1`` (base config
    values of ``model.unet``), 4 x 96 x 96 latents."""
    _common(c, name="unet", image_size=96, num_channels=4, classes=1000)
    c.model.update(dtype="bfloat16", remat="full")
    c.model.diffusion.update(
        schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction="v_prediction",
        vae_workdir="",
    )
    c.model.vae.update(scaling_factor=0.18215)
    c.data.update(source="image_folder", global_batch_size=2048, augment=False)
    c.optim.update(learning_rate=1e-4, warmup_steps=10_000, weight_decay=0.01, schedule="constant",
                   b2=0.999)
    c.train.update(steps=1_000_000, ema_decay=0.9999)
    c.mesh.update(data=1, fsdp=-1)
    c.decode.update(sampler="dpmpp_2m", steps=25, guidance=7.5)


def _dit(c: ConfigDict, size: str, *, learn_sigma: bool = False) -> None:
    """DiT of the paper's ``size`` ("XL/2", ...) on 4 x 32 x 32 latents (DiT paper Table 1
    shapes; ADM's linear schedule, AdamW 1e-4, batch 256, EMA 0.9999)."""
    from tessera.models.dit import size_fields

    _common(c, name="dit", image_size=32, num_channels=4, classes=1000)
    fields = size_fields(size)
    c.model.update(
        **fields,
        norm_eps=1e-6,  # the paper's code (diffusers' default is 1e-5)
        dtype="bfloat16",
        remat="full" if fields["num_layers"] > 12 else "none",
    )
    c.model.dit.learn_sigma = learn_sigma
    c.model.diffusion.update(
        schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="epsilon"
    )
    c.data.update(source="image_folder", global_batch_size=256, augment=True, crop_padding=0)
    c.optim.update(learning_rate=1e-4, warmup_steps=0, weight_decay=0.0, schedule="constant",
                   b2=0.999, clip_norm=0.0)
    c.train.update(steps=400_000, ema_decay=0.9999)
    c.mesh.update(data=1, fsdp=-1)
    c.decode.update(sampler="ddpm", steps=250, guidance=1.5)


get_config = make_get_config(
    {
        "tiny": lambda c: _tiny_unet(c, latent=False),
        "tiny_dit": lambda c: _tiny_dit(c, latent=False),
        "tiny_latent": lambda c: _tiny_unet(c, latent=True),
        "tiny_dit_latent": lambda c: _tiny_dit(c, latent=True),
        "sd21": _sd21,
        "dit_s2": lambda c: _dit(c, "S/2"),
        "dit_b2": lambda c: _dit(c, "B/2"),
        "dit_l2": lambda c: _dit(c, "L/2"),
        "dit_xl2": lambda c: _dit(c, "XL/2", learn_sigma=True),
    }
)
