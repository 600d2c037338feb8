"""Every supported Hugging Face family, registered by importing its module."""

from tessera.convert.families import dit, llama, mamba, moe, retnet, rwkv, unet, vit  # noqa: F401
from tessera.convert.mapping import FAMILIES, family_for

__all__ = ["FAMILIES", "family_for"]
