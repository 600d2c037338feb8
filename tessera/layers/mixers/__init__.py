"""Sequence mixers and channel mixers by the names config patterns use (``"attention:mlp"``)."""

from tessera.layers.mixers.attention import Attention
from tessera.layers.mixers.base import SeqInfo, write_cache
from tessera.layers.mixers.mamba import Mamba
from tessera.layers.mixers.mamba2 import Mamba2
from tessera.layers.mlp import MLP

SEQUENCE_MIXERS = {"attention": Attention, "mamba": Mamba, "mamba2": Mamba2}
CHANNEL_MIXERS = {"mlp": MLP, "none": None}

__all__ = ["CHANNEL_MIXERS", "SEQUENCE_MIXERS", "Attention", "Mamba2", "SeqInfo", "write_cache"]
