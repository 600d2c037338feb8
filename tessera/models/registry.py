"""``config.model.name`` -> constructor.

Adding a family: a config file, an entry here, and the layers it needs.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.models.classifier import SequenceClassifier
from tessera.models.dit import DiT
from tessera.models.lm import LM
from tessera.models.unet import UNet
from tessera.models.vae import VAE
from tessera.models.vit import ViT

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "lm": LM,
    "sequence_classifier": SequenceClassifier,
    "vae": VAE,
    "vit": ViT,
    "unet": UNet,
    "dit": DiT,
}


def build_model(cfg: ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    """Construct ``cfg.model`` (the model section of a config)."""
    if cfg.name not in MODELS:
        raise ValueError(f"model.name: unknown model {cfg.name!r}; known: {sorted(MODELS)}")
    return MODELS[cfg.name](cfg, rngs=rngs)
