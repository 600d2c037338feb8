"""The block stack every model of stacked blocks shares (the decoder LM, the ViT).

An optional prefix of blocks run once (``config.model.prefix``), then a repeating unit of blocks
(``config.model.pattern``, with per-block settings, see ``models/layout.py``) stacked with
``nnx.vmap`` and run with ``nnx.scan`` so compile time does not grow with depth
(``scan_layers=False`` unrolls it, e.g. for FLOP cross-checks). Each block is
``norm -> sequence mixer -> residual -> norm -> channel mixer -> residual``; the remat policy
(``model.remat``) wraps each block of the prefix and each repetition of the unit. Auxiliary
losses and statistics of the blocks reach the model's aux through the scan (see
``layers/mixers/base.py``).

Cross-layer streams: a dict carried from block to block through the prefix and the scan (with
``x``), for values one layer computes and later layers read (RWKV-7's value residual: the first
layer's values, ``v_first``). A sequence mixer class naming keys in ``STREAMS`` is called as
``mixer(x, info, cache, streams) -> (y, cache, aux, streams)``; a scan carry cannot grow, so a key
the scanned pattern reads must be set by a prefix block (checked, with a message saying so).

Stateful channel mixers (RWKV's channel mix keeps its token shift): a channel mixer class with
``init_cache`` is called as ``channel(x, info, cache) -> (y, aux, cache)``, and the block's cache
is then ``(sequence mixer cache, channel mixer cache)`` (``block_init_cache``).

Training noise: given an rng, the block at depth ``l`` (0-based over all ``num_layers``) draws
from ``fold_in(rng, l)`` (one key per layer, the same scanned or unrolled): dropout
(``model.dropout``) on each mixer's output and drop path at rate
``model.stochastic_depth * l / (num_layers - 1)`` on each residual branch, independently. Without
an rng (the LM always) the blocks are deterministic.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.layers.dropout import drop_path, dropout
from tessera.layers.mixers import CHANNEL_MIXERS, SEQUENCE_MIXERS, SeqInfo
from tessera.layers.mixers.base import Aux, merge_aux
from tessera.layers.norms import make_norm
from tessera.models.layout import BlockSpec, parse_layout
from tessera.models.remat import remat_policy
from tessera.sharding import constrain


class Block(nnx.Module):
    """``norm -> sequence mixer -> residual -> norm -> channel mixer -> residual``, built with the
    block's own config (model config plus its per-block settings)."""

    def __init__(self, cfg: ConfigDict, spec: BlockSpec, *, rngs: nnx.Rngs):
        cfg = spec.config(cfg)
        self.norm1 = make_norm(cfg, rngs=rngs)
        self.mixer = SEQUENCE_MIXERS[spec.mixer](cfg, rngs=rngs)
        channel_cls = CHANNEL_MIXERS[spec.channel]
        if channel_cls is None:
            self.norm2 = self.channel = None
        else:
            self.norm2 = make_norm(cfg, rngs=rngs)
            self.channel = channel_cls(cfg, rngs=rngs)
        self.stateful_channel = stateful_channel(spec)
        self.dropout = float(cfg.dropout)
        self.stochastic_depth = float(cfg.stochastic_depth)
        self.num_layers = int(cfg.num_layers)

    def drop_path_rate(self, depth: int | jax.Array) -> float | jax.Array:
        """Stochastic-depth rate of the block at ``depth``: 0 at the first layer, rising
        linearly to ``model.stochastic_depth`` at the last."""
        return self.stochastic_depth * depth / max(self.num_layers - 1, 1)

    def _noise(self, h: jax.Array, key: jax.Array | None, depth: int | jax.Array) -> jax.Array:
        """A residual branch's output with dropout and drop path applied (none without a key)."""
        if key is None:
            return h
        drop_key, path_key = jax.random.split(key)
        h = dropout(h, self.dropout, drop_key)
        if self.stochastic_depth:
            h = drop_path(h, self.drop_path_rate(depth), path_key)
        return h

    def __call__(
        self,
        x: jax.Array,
        info: SeqInfo,
        cache: Any,
        rng: jax.Array | None = None,
        depth: int | jax.Array = 0,
        streams: dict | None = None,
    ) -> tuple[jax.Array, Any, Aux, dict]:
        """x [B, T, D] -> (x [B, T, D], the block's new cache, aux, streams). ``rng``: the
        pass's training key (None: deterministic); ``depth``: this block's layer index (traced
        in the scan); ``streams``: the cross-layer values carried through the stack (module
        docstring)."""
        streams = {} if streams is None else streams
        keys = (None, None)
        if rng is not None:
            keys = tuple(jax.random.split(jax.random.fold_in(rng, depth)))
        mixer_cache, channel_cache = cache, None
        if self.stateful_channel and cache is not None:
            mixer_cache, channel_cache = cache
        if getattr(self.mixer, "STREAMS", ()):
            h, mixer_cache, aux, streams = self.mixer(self.norm1(x), info, mixer_cache, streams)
        else:
            h, mixer_cache, aux = self.mixer(self.norm1(x), info, mixer_cache)
        x = x + self._noise(h, keys[0], depth)
        if self.channel is not None:
            if self.stateful_channel:
                h, channel_aux, channel_cache = self.channel(self.norm2(x), info, channel_cache)
            else:
                h, channel_aux = self.channel(self.norm2(x), info)
            x = x + self._noise(h, keys[1], depth)
            aux = merge_aux(aux, channel_aux)
        if self.stateful_channel and cache is not None:
            cache = (mixer_cache, channel_cache)
        else:
            cache = mixer_cache
        return constrain(x, ("batch", "length", "act_embed")), cache, aux, streams


def stateful_channel(spec: BlockSpec) -> bool:
    """Whether the block's channel mixer keeps decode state (RWKV's token shift): then the
    block's cache is ``(sequence mixer cache, channel mixer cache)``."""
    cls = CHANNEL_MIXERS[spec.channel]
    return cls is not None and hasattr(cls, "init_cache")


def block_init_cache(spec: BlockSpec, cfg: ConfigDict, batch: int, length: int, dtype: Any) -> Any:
    """The empty decode state of one block (``length`` token slots)."""
    cfg = spec.config(cfg)
    cache = SEQUENCE_MIXERS[spec.mixer].init_cache(cfg, batch, length, dtype)
    if stateful_channel(spec):
        return cache, CHANNEL_MIXERS[spec.channel].init_cache(cfg, batch, length, dtype)
    return cache


def block_cache_axes(spec: BlockSpec) -> Any:
    """Logical axis names of ``block_init_cache``'s arrays."""
    axes = SEQUENCE_MIXERS[spec.mixer].cache_axes()
    if stateful_channel(spec):
        return axes, CHANNEL_MIXERS[spec.channel].cache_axes()
    return axes


class Unit(nnx.Module):
    """One repetition of the block pattern."""

    def __init__(self, cfg: ConfigDict, pattern: tuple[BlockSpec, ...], *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, spec, rngs=rngs) for spec in pattern])

    def __call__(
        self,
        carry: tuple[jax.Array, dict],
        info: SeqInfo,
        caches: tuple | None,
        rng: jax.Array | None = None,
        depth: int | jax.Array = 0,
    ) -> tuple[tuple[jax.Array, dict], Any, tuple[Aux, ...]]:
        """``carry``: (x, streams); ``depth``: the layer index of the unit's first block."""
        x, streams = carry
        new, auxes = [], []
        for i, block in enumerate(self.blocks):
            layer_cache = None if caches is None else caches[i]
            x, c, aux, streams = block(x, info, layer_cache, rng, depth + i, streams)
            new.append(c)
            auxes.append(aux)
        return (x, streams), (None if caches is None else tuple(new)), tuple(auxes)


def collect_aux(prefix: list[Aux], stacked: tuple[Aux, ...]) -> Aux:
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


class BlockStack(nnx.Module):
    """Base of the models built around the stack. ``_init_stack`` sets ``layout``, ``repeats``,
    ``prefix`` (None without one) and ``units`` as top-level attributes, so parameter paths are
    ``prefix/<i>/...`` and ``units/blocks/<j>/...`` (leading ``layers`` axis when scanned;
    ``units/<r>/blocks/<j>/...`` unrolled); ``_run_blocks`` runs them. Subclasses set ``cfg``."""

    cfg: ConfigDict

    def _init_stack(self, cfg: ConfigDict, rngs: nnx.Rngs) -> None:
        self.layout = parse_layout(cfg)
        self.repeats = self.layout.repeats
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

    def _check_streams(self, streams: dict) -> None:
        """The scan's carry cannot grow: every stream a scanned mixer reads must exist before
        the scan, i.e. be set by a prefix block."""
        for spec in self.layout.pattern:
            reads = getattr(SEQUENCE_MIXERS[spec.mixer], "STREAMS", ())
            missing = [k for k in reads if k not in streams]
            if missing:
                raise ValueError(
                    f"model.pattern block {str(spec)!r} reads the cross-layer value(s) {missing} "
                    "that the first layer sets: put the first layer in model.prefix (e.g. "
                    f"prefix=({str(spec)!r},) and one layer fewer in the scanned pattern)"
                )

    def _run_blocks(
        self, x: jax.Array, info: SeqInfo, cache: dict | None, rng: jax.Array | None = None
    ) -> tuple[jax.Array, tuple | None, tuple | None, Aux]:
        """Prefix blocks, then the unit scanned (or unrolled) ``repeats`` times: (x, prefix
        caches, unit caches (stacked when scanned, one tuple per repeat unrolled; None without
        ``cache``), aux). ``rng``: training noise
        (module docstring); None: deterministic."""
        policy = remat_policy(self.cfg.remat)
        scanned = self.cfg.scan_layers

        def call(module: Block | Unit, *args: Any) -> tuple[Any, ...]:
            return module(*args)  # blocks: (x, info, cache, rng, depth, streams); units: ((x,
            # streams), info, caches, rng, depth)

        unit_body = block_body = call
        if policy is not None:
            unit_body = nnx.remat(call, policy=policy, prevent_cse=not scanned)
            block_body = nnx.remat(call, policy=policy)

        prefix_caches, prefix_aux = [], []
        streams: dict = {}
        for i, block in enumerate(self.prefix or ()):
            layer_cache = None if cache is None else cache["prefix"][i]
            x, c, aux, streams = block_body(block, x, info, layer_cache, rng, i, streams)
            prefix_caches.append(c)
            prefix_aux.append(aux)
        caches = None if cache is None else cache["layers"]
        first = len(self.layout.prefix)
        width = len(self.layout.pattern)
        self._check_streams(streams)
        if scanned:
            depths = first + width * jnp.arange(self.repeats, dtype=jnp.int32)
            scan = nnx.scan(
                unit_body, in_axes=(0, nnx.Carry, None, 0, None, 0), out_axes=(nnx.Carry, 0, 0)
            )
            (x, streams), caches, unit_aux = scan(
                self.units, (x, streams), info, caches, rng, depths
            )
        else:
            outs, auxes = [], []
            for i, unit in enumerate(self.units):
                layer_caches = None if caches is None else caches[i]  # this repeat's own arrays
                (x, streams), c, aux = unit_body(
                    unit, (x, streams), info, layer_caches, rng, first + width * i
                )
                outs.append(c)
                auxes.append(aux)
            caches = None if caches is None else tuple(outs)
            unit_aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
        aux = collect_aux(prefix_aux, unit_aux)
        return x, (None if cache is None else tuple(prefix_caches)), caches, aux
