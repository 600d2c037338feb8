"""Every supported Hugging Face family, registered by importing its module."""

from tessera.convert.families import (  # noqa: F401
    dit,
    llama,
    mamba,
    moe,
    retnet,
    rwkv,
    unet,
    vae,
    vit,
)
from tessera.convert.mapping import FAMILIES, family_for

__all__ = ["FAMILIES", "family_for"]
