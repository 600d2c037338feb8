"""The one decoder LM for every sequence family.

The stack repeats a pattern of blocks (``config.model.pattern``, entries ``"mixer:channel"``); each
block is ``norm -> sequence mixer -> residual -> norm -> channel mixer -> residual``. The repeating
unit is stacked and run with ``nnx.scan`` so compile time does not grow with depth
(``scan_layers=False`` unrolls it, e.g. for FLOP cross-checks).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from tessera.configs.base import ConfigDict
from tessera.layers.embeddings import Embed, LMHead
from tessera.layers.mixers import CHANNEL_MIXERS, SEQUENCE_MIXERS, SeqInfo, write_cache
from tessera.layers.norms import RMSNorm
from tessera.models.remat import remat_policy
from tessera.sharding import constrain


@struct.dataclass
class ModelOutput:
    """logits [B, T, V] (compute dtype); cache (updated, or None); aux losses and stats."""

    logits: jax.Array
    cache: Any = None
    aux: dict = struct.field(default_factory=dict)


def parse_pattern(cfg: ConfigDict) -> list[tuple[str, str]]:
    """``("attention:mlp", "mamba2:none")`` -> [(mixer, channel), ...], validated."""
    blocks = []
    for entry in cfg.pattern:
        mixer, _, channel = entry.partition(":")
        channel = channel or "mlp"
        if mixer not in SEQUENCE_MIXERS:
            raise ValueError(
                f"model.pattern: unknown mixer {mixer!r}; known: {sorted(SEQUENCE_MIXERS)}"
            )
        if channel not in CHANNEL_MIXERS:
            raise ValueError(
                f"model.pattern: unknown channel mixer {channel!r}; known: {sorted(CHANNEL_MIXERS)}"
            )
        blocks.append((mixer, channel))
    if not blocks or cfg.num_layers % len(blocks):
        raise ValueError(
            f"model.num_layers={cfg.num_layers} is not a multiple of the pattern length "
            f"{len(blocks)}"
        )
    return blocks


def _has_token_axis(axes: Any) -> bool:
    """Whether a mixer's cache (its logical axis names) has a per-token ``cache_length`` axis."""
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    return any("cache_length" in names for names in leaves)


class Block(nnx.Module):
    def __init__(self, cfg: ConfigDict, mixer: str, channel: str, *, rngs: nnx.Rngs):
        pd = cfg.param_dtype
        self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        self.mixer = SEQUENCE_MIXERS[mixer](cfg, rngs=rngs)
        channel_cls = CHANNEL_MIXERS[channel]
        if channel_cls is None:
            self.norm2 = self.channel = None
        else:
            self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
            self.channel = channel_cls(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, info: SeqInfo, cache: Any) -> tuple[jax.Array, Any]:
        h, cache = self.mixer(self.norm1(x), info, cache)
        x = x + h
        if self.channel is not None:
            x = x + self.channel(self.norm2(x))
        return constrain(x, ("batch", "length", "act_embed")), cache


class Unit(nnx.Module):
    """One repetition of the block pattern."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, m, c, rngs=rngs) for m, c in parse_pattern(cfg)])

    def __call__(self, x: jax.Array, info: SeqInfo, caches: tuple | None) -> tuple[jax.Array, Any]:
        new = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, info, None if caches is None else caches[i])
            new.append(c)
        return x, (None if caches is None else tuple(new))


class LM(nnx.Module):
    """Decoder LM: ``model(tokens, positions=, segment_ids=, cache=) -> ModelOutput``."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # later edits of the caller's config stay out
        self.cfg = cfg
        self.pattern = parse_pattern(cfg)
        self.repeats = cfg.num_layers // len(self.pattern)
        self.embed = Embed(
            cfg.vocab_size,
            cfg.d_model,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        if cfg.scan_layers:

            @nnx.split_rngs(splits=self.repeats)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r: nnx.Rngs) -> Unit:
                return Unit(cfg, rngs=r)

            self.units = make(rngs)
        else:
            self.units = nnx.List([Unit(cfg, rngs=rngs) for _ in range(self.repeats)])
        self.final_norm = RMSNorm(
            cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.head = (
            None
            if cfg.tie_embeddings
            else LMHead(
                cfg.d_model,
                cfg.vocab_size,
                init_std=cfg.init_std,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                rngs=rngs,
            )
        )

    # -- cache -----------------------------------------------------------------------------
    def cache_length(self, max_len: int) -> int:
        """Token slots S of the cache: ``max_len``, the window for sliding-window attention, and 1
        when no mixer keeps per-token state (pure recurrent stacks: constant memory)."""
        if not any(_has_token_axis(SEQUENCE_MIXERS[m].cache_axes()) for m, _ in self.pattern):
            return 1
        window = int(self.cfg.sliding_window)
        return min(max_len, window) if window else max_len

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict:
        """Empty cache for ``batch`` sequences of up to ``max_len`` tokens.

        ``positions`` [B, S] holds the position stored in each slot (-1: empty), ``lengths`` [B]
        the next position of each sequence, ``layers`` one stacked state per pattern block.
        """
        dtype = jnp.dtype(dtype or self.cfg.dtype)
        s = self.cache_length(max_len)
        layers = tuple(
            jax.tree.map(
                lambda a: jnp.broadcast_to(a, (self.repeats, *a.shape)),
                SEQUENCE_MIXERS[m].init_cache(self.cfg, batch, s, dtype),
            )
            for m, _ in self.pattern
        )
        return {
            "positions": jnp.full((batch, s), -1, jnp.int32),
            "lengths": jnp.zeros((batch,), jnp.int32),
            "layers": layers,
        }

    def cache_axes(self) -> dict:
        """Logical axis names for every array of the cache (for sharding it)."""
        layers = tuple(
            jax.tree.map(
                lambda names: ("layers", *names),
                SEQUENCE_MIXERS[m].cache_axes(),
                is_leaf=lambda x: isinstance(x, tuple),
            )
            for m, _ in self.pattern
        )
        return {
            "positions": ("cache_batch", "cache_length"),
            "lengths": ("cache_batch",),
            "layers": layers,
        }

    # -- forward ---------------------------------------------------------------------------
    def _run_units(self, x: jax.Array, info: SeqInfo, caches: tuple | None):
        policy = remat_policy(self.cfg.remat)

        def body(unit: Unit, x: jax.Array, info: SeqInfo, caches: Any):
            return unit(x, info, caches)

        if policy is not None:
            body = nnx.remat(body, policy=policy, prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            scan = nnx.scan(body, in_axes=(0, nnx.Carry, None, 0), out_axes=(nnx.Carry, 0))
            return scan(self.units, x, info, caches)
        outs = []
        for i, unit in enumerate(self.units):
            layer_caches = None if caches is None else jax.tree.map(lambda a, i=i: a[i], caches)
            x, c = body(unit, x, info, layer_caches)
            outs.append(c)
        if caches is None:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict | None = None,
    ) -> ModelOutput:
        """tokens int32 [B, T]; positions [B, T] (default: continue from the cache, or 0..T-1);
        segment_ids [B, T] (packed documents, 0 = padding; default all 1)."""
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            start = cache["lengths"][:, None] if cache is not None else 0
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
            positions = jnp.broadcast_to(positions, (b, t))
        positions = positions.astype(jnp.int32)
        new_cache = None
        if cache is not None:
            s = cache["positions"].shape[1]
            real = segment_ids > 0
            last = jnp.max(jnp.where(real, positions, -1), axis=1, keepdims=True)
            # Only the last S tokens of this call fit into the cache; the rest are not written.
            keep = real & (positions > last - s)
            slots = jnp.where(keep, positions % s, s)
            info = SeqInfo(positions, segment_ids, cache["positions"], slots)
        else:
            info = SeqInfo(positions, segment_ids)
        x = self.embed(tokens)
        x, layer_caches = self._run_units(x, info, None if cache is None else cache["layers"])
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        if cache is not None:
            new_cache = {
                "positions": write_cache(cache["positions"], positions, info.write_slots),
                "lengths": jnp.maximum(cache["lengths"], last[:, 0] + 1),
                "layers": layer_caches,
            }
        return ModelOutput(logits=logits, cache=new_cache, aux={})
