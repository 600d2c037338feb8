"""The one decoder LM for every sequence family.

Token embedding, the block stack (``models/stack.py``: an optional prefix of blocks run once, then
the repeating unit of blocks scanned with ``nnx.scan``; per-block settings in
``models/layout.py``), final norm and the vocabulary head. Auxiliary losses and statistics of the
blocks reach ``ModelOutput.aux``. The LM passes no training rng: its blocks are deterministic.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from tessera.configs.base import ConfigDict
from tessera.layers.embeddings import Embed, LMHead
from tessera.layers.mixers import SEQUENCE_MIXERS, SeqInfo, write_cache
from tessera.layers.mixers.base import Aux
from tessera.layers.norms import make_norm
from tessera.models.layout import BlockSpec
from tessera.models.stack import BlockStack, block_cache_axes, block_init_cache
from tessera.sharding import is_axis_names


@struct.dataclass
class ModelOutput:
    """logits (LM: [B, T, V] in the compute dtype; classifiers: [B, C] float32); cache (updated,
    or None); aux losses and stats."""

    logits: jax.Array
    cache: Any = None
    aux: dict = struct.field(default_factory=dict)


def _has_token_axis(axes: Any) -> bool:
    """Whether a mixer's cache (its logical axis names) has a per-token ``cache_length`` axis."""
    leaves = jax.tree.leaves(axes, is_leaf=is_axis_names)
    return any("cache_length" in names for names in leaves)


class LM(BlockStack):
    """Decoder LM: ``model(tokens, positions=, segment_ids=, cache=) -> ModelOutput``.

    Subclasses change the readout (``_make_head`` / ``_readout``) and keep the trunk: embedding,
    prefix blocks, the scanned unit, final norm.
    """

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # later edits of the caller's config stay out
        self.cfg = cfg
        self.embed = Embed(
            cfg.vocab_size,
            cfg.d_model,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        # RWKV's ln0: a norm right after the embedding (model.embed_norm)
        self.embed_norm = make_norm(cfg, rngs=rngs) if cfg.get("embed_norm", False) else None
        self._init_stack(cfg, rngs)
        self.final_norm = make_norm(cfg, rngs=rngs)
        self.head = self._make_head(cfg, rngs)

    def _make_head(self, cfg: ConfigDict, rngs: nnx.Rngs) -> nnx.Module | None:
        if cfg.tie_embeddings:
            return None
        return LMHead(
            cfg.d_model,
            cfg.vocab_size,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
            impl=cfg.get("dense_impl", "auto"),
        )

    def _readout(self, x: jax.Array, info: SeqInfo) -> jax.Array:
        """Final hidden states [B, T, D] -> vocabulary logits [B, T, V]."""
        del info
        return self.embed.attend(x) if self.head is None else self.head(x)

    # -- cache -----------------------------------------------------------------------------
    def _block_cache_kinds(self) -> list[tuple[bool, int]]:
        """(keeps per-token state, sliding window or 0) of every block in the layout."""
        out = []
        for spec in (*self.layout.prefix, *self.layout.pattern):
            token = _has_token_axis(SEQUENCE_MIXERS[spec.mixer].cache_axes())
            out.append((token, int(spec.config(self.cfg).sliding_window) if token else 0))
        return out

    def cache_length(self, max_len: int) -> int:
        """Token slots S of the cache, shared by all layers: ``max_len``; the largest window when
        every attention block has a sliding window (ring buffer); 1 when no mixer keeps
        per-token state (pure recurrent stacks: constant memory)."""
        windows = [w for token, w in self._block_cache_kinds() if token]
        if not windows:
            return 1
        return max_len if 0 in windows else min(max_len, max(windows))

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict:
        """Empty cache for ``batch`` sequences of up to ``max_len`` tokens.

        ``positions`` [B, S] holds the position stored in each slot (-1: empty), ``lengths`` [B]
        the next position of each sequence, ``prefix`` one state per prefix block and
        ``layers`` one state per pattern block, stacked over the repeats (``scan_layers``), or
        unrolled: one tuple of pattern-block states per repeat, every layer its own arrays.
        """
        dtype = jnp.dtype(dtype or self.cfg.dtype)
        s = self.cache_length(max_len)

        def one(spec: BlockSpec) -> Any:
            return block_init_cache(spec, self.cfg, batch, s, dtype)

        if self.cfg.scan_layers:
            layers: tuple = tuple(
                jax.tree.map(lambda a: jnp.broadcast_to(a, (self.repeats, *a.shape)), one(spec))
                for spec in self.layout.pattern
            )
        else:  # one array per layer: a decode step updates each in place
            layers = tuple(
                tuple(one(spec) for spec in self.layout.pattern) for _ in range(self.repeats)
            )
        return {
            "positions": jnp.full((batch, s), -1, jnp.int32),
            "lengths": jnp.zeros((batch,), jnp.int32),
            "prefix": tuple(one(spec) for spec in self.layout.prefix),
            "layers": layers,
        }

    def cache_axes(self) -> dict:
        """Logical axis names for every array of the cache (for sharding it)."""
        if self.cfg.scan_layers:
            layers: tuple = tuple(
                jax.tree.map(
                    lambda names: ("layers", *names),
                    block_cache_axes(spec),
                    is_leaf=is_axis_names,
                )
                for spec in self.layout.pattern
            )
        else:
            unit = tuple(block_cache_axes(spec) for spec in self.layout.pattern)
            layers = (unit,) * self.repeats
        return {
            "positions": ("cache_batch", "cache_length"),
            "lengths": ("cache_batch",),
            "prefix": tuple(block_cache_axes(spec) for spec in self.layout.prefix),
            "layers": layers,
        }

    # -- forward ---------------------------------------------------------------------------
    def features(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict | None = None,
    ) -> tuple[jax.Array, SeqInfo, dict | None, Aux]:
        """The trunk: (final-normed hidden states [B, T, D], the SeqInfo of the call, updated
        cache or None, aux). Arguments as for ``__call__``."""
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            start = cache["lengths"][:, None] if cache is not None else 0
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
            positions = jnp.broadcast_to(positions, (b, t))
        positions = positions.astype(jnp.int32)
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
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x, prefix_caches, layer_caches, aux = self._run_blocks(x, info, cache)
        x = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_cache = {
                "positions": write_cache(cache["positions"], positions, info.write_slots),
                "lengths": jnp.maximum(cache["lengths"], last[:, 0] + 1),
                "prefix": prefix_caches,
                "layers": layer_caches,
            }
        return x, info, new_cache, aux

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
        x, info, new_cache, aux = self.features(
            tokens, positions=positions, segment_ids=segment_ids, cache=cache
        )
        return ModelOutput(logits=self._readout(x, info), cache=new_cache, aux=aux)
