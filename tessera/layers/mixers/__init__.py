"""Sequence mixers and channel mixers by the names config patterns use (``"attention:mlp"``).

Adding a mixer: write its module (with the declarations listed in ``base.py``) and add one entry
here; its logical-axis rules are registered with the sharding table from this registry, and its
FLOP count and remat tags are read from its class. No other table changes.
"""

from tessera.layers.mixers.attention import Attention
from tessera.layers.mixers.base import Aux, SeqInfo, merge_aux, write_cache
from tessera.layers.mixers.mamba import Mamba
from tessera.layers.mixers.mamba2 import Mamba2
from tessera.layers.mixers.mla import MLA
from tessera.layers.mixers.retention import Retention
from tessera.layers.mixers.rwkv6 import RWKV6, RWKV6ChannelMix
from tessera.layers.mixers.rwkv7 import RWKV7, RWKV7ChannelMix
from tessera.layers.mlp import MLP
from tessera.layers.moe import MoE
from tessera.sharding.rules import register_logical_rules

SEQUENCE_MIXERS: dict[str, type] = {
    "attention": Attention,
    "mamba": Mamba,
    "mamba2": Mamba2,
    "mla": MLA,
    "rwkv6": RWKV6,
    "retention": Retention,
    "rwkv7": RWKV7,
}
CHANNEL_MIXERS: dict[str, type | None] = {
    "mlp": MLP,
    "moe": MoE,
    "rwkv6_cmix": RWKV6ChannelMix,
    "rwkv7_cmix": RWKV7ChannelMix,
    "none": None,
}

for _name, _cls in (*SEQUENCE_MIXERS.items(), *CHANNEL_MIXERS.items()):
    if _cls is not None:
        register_logical_rules(_name, getattr(_cls, "LOGICAL_RULES", {}))

__all__ = [
    "CHANNEL_MIXERS",
    "SEQUENCE_MIXERS",
    "Attention",
    "Aux",
    "Mamba",
    "Mamba2",
    "MLA",
    "MoE",
    "RWKV6",
    "RWKV6ChannelMix",
    "Retention",
    "RWKV7",
    "RWKV7ChannelMix",
    "SeqInfo",
    "merge_aux",
    "write_cache",
]
