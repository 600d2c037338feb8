"""Config parts the diffusers families share (``vae.py``, ``unet.py``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError


@dataclasses.dataclass(frozen=True)
class SameChannels:
    """``in_channels`` = ``out_channels`` <-> ``num_channels``: the model outputs its input's
    channels (``default``: diffusers' value when the key is missing; ``what``: the model, for
    the error)."""

    default: int
    what: str

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        cin = int(hf.get("in_channels", self.default))
        cout = int(hf.get("out_channels", self.default))
        if cin != cout:
            raise ConversionError(
                f"config.json in_channels={cin} != out_channels={cout} is not supported "
                f"(tessera's {self.what} outputs its input's channels)"
            )
        return {"num_channels": cin}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {"in_channels": int(model.num_channels), "out_channels": int(model.num_channels)}


def square_sample_size(size: Any) -> int:
    """diffusers' ``sample_size``: an int, or [h, w] (square only)."""
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise ConversionError(
                f"config.json sample_size={list(size)} is not supported (square inputs only)"
            )
        size = size[0]
    return int(size)
