"""A sequence classifier: the decoder LM's trunk read out at the last real token of each row.

``SequenceClassifier(tokens, positions=, segment_ids=) -> ModelOutput`` with logits
[B, num_classes] in float32. The trunk is causal, so the last real token (the last position whose
segment id is > 0) is the only one that has seen the whole row. The head replaces the LM's
vocabulary head (the token embedding is kept, for the inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.layers.embeddings import ClassHead
from tessera.layers.mixers import SeqInfo
from tessera.models.lm import LM


class SequenceClassifier(LM):
    """``model.name = "sequence_classifier"``: ``model.num_classes`` classes per row."""

    def _make_head(self, cfg: ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        if cfg.num_classes <= 0:
            raise ValueError(
                f"sequence_classifier needs model.num_classes > 0, got {cfg.num_classes}"
            )
        return ClassHead(
            cfg.d_model,
            cfg.num_classes,
            init_std=cfg.init_std,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )

    def _readout(self, x: jax.Array, info: SeqInfo) -> jax.Array:
        """Final hidden states [B, T, D] -> logits [B, C] of each row's last real token (the
        first token of an all-padding row)."""
        t = x.shape[1]
        last = jnp.max(jnp.where(info.segment_ids > 0, jnp.arange(t), 0), axis=1)
        pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return self.head(pooled)
