"""The one decoder LM for every sequence family.

The stack is an optional prefix of blocks run once (``config.model.prefix``) and a repeating unit
of blocks (``config.model.pattern``), with per-block settings (see ``models/layout.py``); each
block is ``norm -> sequence mixer -> residual -> norm -> channel mixer -> residual``. The repeating
unit is stacked and run with ``nnx.scan`` so compile time does not grow with depth
(``scan_layers=False`` unrolls it, e.g. for FLOP cross-checks). Auxiliary losses and statistics
of the blocks reach ``ModelOutput.aux`` through the scan (see ``layers/mixers/base.py``).
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
from tessera.layers.mixers.base import Aux, merge_aux
from tessera.layers.norms import RMSNorm
from tessera.models.layout import BlockSpec, parse_layout
from tessera.models.remat import remat_policy
from tessera.sharding import constrain, is_axis_names


@struct.dataclass
class ModelOutput:
    """logits [B, T, V] (compute dtype); cache (updated, or None); aux losses and stats."""

    logits: jax.Array
    cache: Any = None
    aux: dict = struct.field(default_factory=dict)


def _has_token_axis(axes: Any) -> bool:
    """Whether a mixer's cache (its logical axis names) has a per-token ``cache_length`` axis."""
    leaves = jax.tree.leaves(axes, is_leaf=is_axis_names)
    return any("cache_length" in names for names in leaves)


class Block(nnx.Module):
    """``norm -> sequence mixer -> residual -> norm -> channel mixer -> residual``, built with the
    block's own config (model config plus its per-block settings)."""

    def __init__(self, cfg: ConfigDict, spec: BlockSpec, *, rngs: nnx.Rngs):
        cfg = spec.config(cfg)
        pd = cfg.param_dtype
        self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        self.mixer = SEQUENCE_MIXERS[spec.mixer](cfg, rngs=rngs)
        channel_cls = CHANNEL_MIXERS[spec.channel]
        if channel_cls is None:
            self.norm2 = self.channel = None
        else:
            self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
            self.channel = channel_cls(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, info: SeqInfo, cache: Any) -> tuple[jax.Array, Any, Aux]:
        h, cache, aux = self.mixer(self.norm1(x), info, cache)
        x = x + h
        if self.channel is not None:
            h, channel_aux = self.channel(self.norm2(x), info)
            x = x + h
            aux = merge_aux(aux, channel_aux)
        return constrain(x, ("batch", "length", "act_embed")), cache, aux


class Unit(nnx.Module):
    """One repetition of the block pattern."""

    def __init__(self, cfg: ConfigDict, pattern: tuple[BlockSpec, ...], *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, spec, rngs=rngs) for spec in pattern])

    def __call__(
        self, x: jax.Array, info: SeqInfo, caches: tuple | None
    ) -> tuple[jax.Array, Any, tuple[Aux, ...]]:
        new, auxes = [], []
        for i, block in enumerate(self.blocks):
            x, c, aux = block(x, info, None if caches is None else caches[i])
            new.append(c)
            auxes.append(aux)
        return x, (None if caches is None else tuple(new)), tuple(auxes)


def _collect_aux(prefix: list[Aux], stacked: tuple[Aux, ...]) -> Aux:
    """Model-level aux from per-layer outputs: ``prefix`` (one dict per prefix block) and
    ``stacked`` (one dict per pattern position, arrays [repeats, ...]). Losses are summed over
    layers; statistics are stacked in depth order, [layers emitting them, ...]."""
    keys = sorted({k for a in (*prefix, *stacked) for k in a})
    out: Aux = {}
    for key in keys:
        first = [a[key][None] for a in prefix if key in a]
        rest = [a[key] for a in stacked if key in a]
        try:
            if rest:  # [R, P', ...] -> [R * P', ...]: depth order within the scanned stack
                per = jnp.stack(rest, axis=1)
                first.append(per.reshape(-1, *per.shape[2:]))
            values = jnp.concatenate(first, axis=0)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"auxiliary output {key!r} has different shapes in different layers: {e}"
            ) from None
        out[key] = jnp.sum(values, axis=0) if key.endswith("_loss") else values
    return out


class LM(nnx.Module):
    """Decoder LM: ``model(tokens, positions=, segment_ids=, cache=) -> ModelOutput``.

    Subclasses change the readout (``_make_head`` / ``_readout``) and keep the trunk: embedding,
    prefix blocks, the scanned unit, final norm.
    """

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # later edits of the caller's config stay out
        self.cfg = cfg
        self.layout = parse_layout(cfg)
        self.repeats = self.layout.repeats
        self.embed = Embed(
            cfg.vocab_size,
            cfg.d_model,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        if self.layout.prefix:
            self.prefix = nnx.List([Block(cfg, spec, rngs=rngs) for spec in self.layout.prefix])
        else:
            self.prefix = None
        pattern = self.layout.pattern
        if cfg.scan_layers:

            @nnx.split_rngs(splits=self.repeats)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r: nnx.Rngs) -> Unit:
                return Unit(cfg, pattern, rngs=r)

            self.units = make(rngs)
        else:
            self.units = nnx.List([Unit(cfg, pattern, rngs=rngs) for _ in range(self.repeats)])
        self.final_norm = RMSNorm(
            cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs
        )
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
        ``layers`` one state per pattern block, stacked over the repeats.
        """
        dtype = jnp.dtype(dtype or self.cfg.dtype)
        s = self.cache_length(max_len)

        def one(spec: BlockSpec) -> Any:
            return SEQUENCE_MIXERS[spec.mixer].init_cache(spec.config(self.cfg), batch, s, dtype)

        layers = tuple(
            jax.tree.map(lambda a: jnp.broadcast_to(a, (self.repeats, *a.shape)), one(spec))
            for spec in self.layout.pattern
        )
        return {
            "positions": jnp.full((batch, s), -1, jnp.int32),
            "lengths": jnp.zeros((batch,), jnp.int32),
            "prefix": tuple(one(spec) for spec in self.layout.prefix),
            "layers": layers,
        }

    def cache_axes(self) -> dict:
        """Logical axis names for every array of the cache (for sharding it)."""
        layers = tuple(
            jax.tree.map(
                lambda names: ("layers", *names),
                SEQUENCE_MIXERS[spec.mixer].cache_axes(),
                is_leaf=is_axis_names,
            )
            for spec in self.layout.pattern
        )
        return {
            "positions": ("cache_batch", "cache_length"),
            "lengths": ("cache_batch",),
            "prefix": tuple(SEQUENCE_MIXERS[s.mixer].cache_axes() for s in self.layout.prefix),
            "layers": layers,
        }

    # -- forward ---------------------------------------------------------------------------
    def _run_blocks(
        self, x: jax.Array, info: SeqInfo, cache: dict | None
    ) -> tuple[jax.Array, tuple | None, tuple | None, Aux]:
        """Prefix blocks, then the unit scanned (or unrolled) ``repeats`` times."""
        policy = remat_policy(self.cfg.remat)
        scanned = self.cfg.scan_layers

        def unit_body(unit: Unit, x: jax.Array, info: SeqInfo, caches: Any):
            return unit(x, info, caches)

        def block_body(block: Block, x: jax.Array, info: SeqInfo, caches: Any):
            return block(x, info, caches)

        if policy is not None:
            unit_body = nnx.remat(unit_body, policy=policy, prevent_cse=not scanned)
            block_body = nnx.remat(block_body, policy=policy)

        prefix_caches, prefix_aux = [], []
        for i, block in enumerate(self.prefix or ()):
            x, c, aux = block_body(block, x, info, None if cache is None else cache["prefix"][i])
            prefix_caches.append(c)
            prefix_aux.append(aux)
        caches = None if cache is None else cache["layers"]
        if scanned:
            scan = nnx.scan(unit_body, in_axes=(0, nnx.Carry, None, 0), out_axes=(nnx.Carry, 0, 0))
            x, caches, unit_aux = scan(self.units, x, info, caches)
        else:
            outs, auxes = [], []
            for i, unit in enumerate(self.units):
                layer_caches = None if caches is None else jax.tree.map(lambda a, i=i: a[i], caches)
                x, c, aux = unit_body(unit, x, info, layer_caches)
                outs.append(c)
                auxes.append(aux)
            stack = lambda *a: jnp.stack(a)
            caches = None if caches is None else jax.tree.map(stack, *outs)
            unit_aux = jax.tree.map(stack, *auxes)
        aux = _collect_aux(prefix_aux, unit_aux)
        return x, (None if cache is None else tuple(prefix_caches)), caches, aux

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
