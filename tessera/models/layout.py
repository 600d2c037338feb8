"""Layer layouts: which block sits at which depth, with which per-block settings.

``config.model.prefix`` lists blocks run once before the stack (DeepSeek-V3: three dense layers
first); ``config.model.pattern`` is the repeating unit, scanned ``repeats`` times. An entry is
``"mixer:channel"`` (channel defaults to ``mlp``) optionally followed by per-block settings,
whitespace-separated ``key=value`` pairs that override the model config for that block only::

    pattern = ("attention:mlp sliding_window=4096", "attention:mlp")   # Gemma-2 local/global
    pattern = ("attention:mlp sliding_window=1024 rope_theta=10000",) * 5 + ("attention:mlp",)

Only the keys in ``BLOCK_SETTINGS`` may vary per block: they change what a block computes, never
the shapes of its parameters, so every repetition of the unit still stacks for ``nnx.scan``.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

import ml_collections

from tessera.configs.base import ConfigDict

# model keys a block may set for itself, with the type their values are coerced to
BLOCK_SETTINGS: dict[str, type] = {"sliding_window": int, "rope_theta": float}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block: its sequence mixer, channel mixer and per-block config overrides."""

    mixer: str
    channel: str
    settings: tuple[tuple[str, Any], ...] = ()

    def config(self, model_cfg: ConfigDict) -> ml_collections.FrozenConfigDict:
        """The model config this block is built with: ``model_cfg`` plus its own settings."""
        if not self.settings:
            return ml_collections.FrozenConfigDict(model_cfg)
        cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        for key, value in self.settings:
            cfg[key] = value
        return ml_collections.FrozenConfigDict(cfg)

    def __str__(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.settings)
        return f"{self.mixer}:{self.channel}{extra}"


def parse_block(entry: str, where: str, mixers: Any, channels: Any) -> BlockSpec:
    """``"attention:mlp sliding_window=8"`` -> BlockSpec; errors name ``where`` and the entry."""
    head, *pairs = entry.split()
    mixer, _, channel = head.partition(":")
    channel = channel or "mlp"
    if mixer not in mixers:
        raise ValueError(f"{where}: unknown mixer {mixer!r} in {entry!r}; known: {sorted(mixers)}")
    if channel not in channels:
        raise ValueError(
            f"{where}: unknown channel mixer {channel!r} in {entry!r}; known: {sorted(channels)}"
        )
    settings = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in BLOCK_SETTINGS:
            raise ValueError(
                f"{where}: {pair!r} in {entry!r} is not a per-block setting; use key=value with "
                f"key one of {', '.join(BLOCK_SETTINGS)}"
            )
        try:
            value = BLOCK_SETTINGS[key](ast.literal_eval(text))
        except (ValueError, SyntaxError, TypeError):
            raise ValueError(
                f"{where}: {key}={text!r} in {entry!r} is not a {BLOCK_SETTINGS[key].__name__}"
            ) from None
        settings[key] = value
    return BlockSpec(mixer, channel, tuple(sorted(settings.items())))


@dataclasses.dataclass(frozen=True)
class Layout:
    """prefix blocks (run once each), then ``pattern`` repeated ``repeats`` times."""

    prefix: tuple[BlockSpec, ...]
    pattern: tuple[BlockSpec, ...]
    repeats: int

    def layers(self) -> list[BlockSpec]:
        """Every layer's block, in depth order."""
        return [*self.prefix, *(list(self.pattern) * self.repeats)]

    def layer_index(self, position: int, repeat: int) -> int:
        """Depth of the block at ``position`` of the unit in repetition ``repeat``."""
        return len(self.prefix) + repeat * len(self.pattern) + position


def parse_layout(cfg: ConfigDict) -> Layout:
    """The validated layout of ``cfg`` (the model section)."""
    from tessera.layers.mixers import CHANNEL_MIXERS, SEQUENCE_MIXERS

    def blocks(name: str) -> tuple[BlockSpec, ...]:
        entries = cfg.get(name, ()) or ()
        if isinstance(entries, str):
            entries = (entries,)
        return tuple(
            parse_block(e, f"model.{name}[{i}]", SEQUENCE_MIXERS, CHANNEL_MIXERS)
            for i, e in enumerate(entries)
        )

    prefix, pattern = blocks("prefix"), blocks("pattern")
    if not pattern:
        raise ValueError("model.pattern is empty: give at least one block, e.g. 'attention:mlp'")
    stacked = cfg.num_layers - len(prefix)
    if stacked <= 0 or stacked % len(pattern):
        layers = f"model.num_layers={cfg.num_layers}"
        if prefix:
            layers += f" minus {len(prefix)} prefix blocks ({stacked})"
        raise ValueError(
            f"{layers} is not a positive multiple of the pattern length {len(pattern)}"
        )
    return Layout(prefix, pattern, stacked // len(pattern))


def compress_layers(entries: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prefix, pattern) with the fewest blocks that spells ``entries`` (one per layer, depth
    order): the shortest unrolled prefix followed by the shortest repeating unit. Imports use it
    to turn per-layer settings (Qwen2's ``max_window_layers``, local/global alternations) into a
    scanned layout."""
    n = len(entries)
    if not n:
        raise ValueError("compress_layers: no layers")
    best = None
    for p in range(n):
        rest = entries[p:]
        for q in range(1, len(rest) + 1):
            if len(rest) % q == 0 and rest == rest[:q] * (len(rest) // q):
                if best is None or p + q < best[0] + best[1]:
                    best = (p, q)
                break
    p, q = best
    return tuple(entries[:p]), tuple(entries[p : p + q])


def layer_mixers(cfg: ConfigDict) -> list[tuple[ml_collections.FrozenConfigDict, dict[str, Any]]]:
    """Every layer of ``cfg``'s layout in depth order: (its block config, its mixer classes by
    parameter slot: ``{"mixer": sequence mixer, "channel": channel mixer or None}``)."""
    from tessera.layers.mixers import CHANNEL_MIXERS, SEQUENCE_MIXERS

    return [
        (spec.config(cfg), {"mixer": SEQUENCE_MIXERS[spec.mixer],
                            "channel": CHANNEL_MIXERS[spec.channel]})
        for spec in parse_layout(cfg).layers()
    ]
