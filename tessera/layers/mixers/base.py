"""What every mixer receives besides its input (positions, segments, cache slots), what it may
return besides its output (auxiliary losses and statistics), and what it declares about itself.

A sequence mixer is an ``nnx.Module`` built as ``cls(cfg, rngs=...)`` from the (per-block) model
config, called as ``mixer(x, info, cache) -> (y, new_cache, aux)``; a channel mixer is called as
``mixer(x, info) -> (y, aux)``. Next to its code each mixer class declares:

  init_cache(cfg, batch, length, dtype) / cache_axes()   sequence mixers: its decode state
  flops_per_token(cfg, seq_len) -> float                 forward FLOPs per token (for MFU); a
                                                         mixer without it gets a warning, no MFU
  REMAT_SAVED: tuple[str, ...]                           ``checkpoint_name`` tags the ``minimal``
                                                         remat policy keeps
  LOGICAL_RULES: dict[str, tuple[str, ...]]              default mesh axes of the logical axis
                                                         names only this mixer uses
  CAUSAL_SCORES: bool (optional)                         its FLOPs count a T x T causal score
                                                         block in full; the causal-half MFU
                                                         convention halves that part
  AUX_STATS: tuple[str, ...] (optional)                  the statistics it always emits, so
                                                         rows of a stacked statistic map to
                                                         depths (metrics name them layer_<d>)
  RULE_UPDATES: tuple[RuleUpdate, ...] (optional)        parameters set after each train step
                                                         by a rule from its own statistics, not
                                                         by the optimizer (``layers/base.py``)
  check_mesh(cfg, sizes, rules) (optional)               a ValueError when the mesh cannot hold
                                                         it (MoE: experts / expert axis)
  STREAMS: tuple[str, ...] (optional, sequence mixers)   cross-layer values it reads or sets;
                                                         then it is called ``mixer(x, info,
                                                         cache, streams) -> (y, cache, aux,
                                                         streams)`` (``models/stack.py``)
  init_cache / cache_axes (optional, channel mixers)     a stateful channel mixer (RWKV's token
                                                         shift): called ``mixer(x, info, cache)
                                                         -> (y, aux, cache)``

Auxiliary outputs (``Aux``): a flat dict of arrays. Keys ending in ``_loss`` are scalar losses,
already multiplied by the weight the layer's config gives them; the model sums them over layers
and the task adds them to the training loss. Other keys are statistics (e.g. per-expert load),
stacked over the layers that emit them; the task reports them as ``aux/<key>`` metrics and the
Trainer logs one value per layer (the max and min of a vector statistic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Aux = dict[str, jax.Array]


@struct.dataclass
class SeqInfo:
    """Per-token bookkeeping shared by all layers of one forward pass.

    positions:    int32 [B, T] absolute position of each token in its sequence.
    segment_ids:  int32 [B, T] document id for packed rows; 0 marks padding.
    cache_positions: int32 [B, S] position held by each cache slot before this call (-1: empty),
                  or None when running without a cache.
    write_slots:  int32 [B, T] cache slot each token is written to (S: not written), or None.
    """

    positions: jax.Array
    segment_ids: jax.Array
    cache_positions: jax.Array | None = None
    write_slots: jax.Array | None = None


def write_cache(cache: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter ``new`` [B, T, ...] into ``cache`` [B, S, ...] at ``slots`` [B, T] (S: dropped)."""
    b = jnp.arange(cache.shape[0])[:, None]
    return cache.at[b, slots].set(new.astype(cache.dtype), mode="drop")


def decode_keys(info: SeqInfo) -> tuple[jax.Array, jax.Array]:
    """Positions and segment ids [B, S] of the cache slots after a decode step (T = 1) wrote its
    token: ``cache_positions`` with the written slots set, segment 1 where a slot is filled.

    Attending over the cache after the write equals attending over the old cache plus the new
    token (the concat form): the written slot is the only one that changes. Slots fill in
    order, slot = position % S, so it held nothing (-1), or position p - S (ring buffer, S the
    largest window), or the same position p (a rewritten token, replaced by its new value). A key
    at p - S is outside every window (p - (p - S) = S >= W), and a cache without a window is
    never longer than the sequence (S = max_len > p), so no visible key is lost (a rewritten
    position keeps only its new key, where the concat form saw both). A padding query (segment
    0) writes nothing and sees no key, in both forms.
    """
    kv_pos = write_cache(info.cache_positions, info.positions, info.write_slots)
    return kv_pos, (kv_pos >= 0).astype(jnp.int32)


def merge_aux(*parts: Aux) -> Aux:
    """One block's aux from its mixers'; a key emitted twice is an error (names must differ)."""
    out: Aux = {}
    for part in parts:
        for key, value in part.items():
            if key in out:
                raise ValueError(f"auxiliary output {key!r} is emitted twice in one block")
            out[key] = value
    return out
