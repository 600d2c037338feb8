"""Every supported Hugging Face family, registered by importing its module."""

from tessera.convert.families import llama, mamba, moe, retnet, rwkv, vae, vit  # noqa: F401
from tessera.convert.mapping import FAMILIES, family_for

__all__ = ["FAMILIES", "family_for"]
