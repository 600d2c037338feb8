"""What every recurrent mixer (Mamba, Mamba-2, RWKV-6/7, RetNet) needs besides its recurrence:
where documents start in packed rows, inputs from earlier tokens (a causal conv window, RWKV's
token shift) that never reach across a document start, the state those inputs leave in the
decode cache, and Mamba's step-size / decay initialisers.

Conventions shared by the recurrent mixers:
  * Without a cache a row may pack several documents: a document starts at position 0 or where
    the segment id changes. With a cache every row is one sequence continuing its cache (segment
    ids only mark right padding), so only position 0 starts afresh.
  * Padding (segment id 0) is on the right of cached rows; it never moves a state: mixers zero
    its inputs (and step sizes), and the caches here keep what the row's last real token left.
  * ``history`` [B, K-1+T, C] is the K-1 inputs before the call (from the cache, zeros without
    one) followed by the call's T inputs; call-relative index j sits at ``j + K - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tessera.layers.base import Initializer
from tessera.layers.mixers.base import SeqInfo

F32 = jnp.float32


def tokens_since_start(info: SeqInfo, cached: bool) -> jax.Array:
    """int32 [B, T]: how many tokens back the current document began (0 at its first token).

    ``positions`` counts from each document's start; without a cache a segment change also
    starts one (rows packed without position resets). With a cache every row is one sequence
    (segment ids only mark padding), so positions alone decide.
    """
    positions = info.positions.astype(jnp.int32)
    if cached:
        return positions
    seg = info.segment_ids
    t = jnp.arange(seg.shape[1], dtype=jnp.int32)
    change = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    last = jax.lax.cummax(jnp.where(change, t, 0), axis=1)
    return jnp.minimum(positions, t - last)


def document_starts(info: SeqInfo, cached: bool) -> jax.Array:
    """bool [B, T]: real tokens that begin a document; a recurrent state resets before them."""
    return (info.segment_ids > 0) & (tokens_since_start(info, cached) == 0)


def history(x: jax.Array, prev: jax.Array | None, width: int) -> jax.Array:
    """[B, width-1+T, C]: the ``width - 1`` inputs before the call (``prev``, zeros when None),
    then ``x`` [B, T, C], in ``x``'s dtype."""
    b, _, c = x.shape
    if prev is None:
        prev = jnp.zeros((b, width - 1, c), x.dtype)
    return jnp.concatenate([prev.astype(x.dtype), x], axis=1)


def lagged(hist: jax.Array, since_start: jax.Array, lag: int) -> jax.Array:
    """[B, T, C]: the input ``lag`` tokens before each token, read from ``hist``
    [B, K-1+T, C] (``lag`` <= K-1); zero where that reaches before the token's document start
    (``since_start`` [B, T] from ``tokens_since_start``)."""
    t = since_start.shape[1]
    first = hist.shape[1] - t - lag
    out = hist[:, first : first + t]
    if lag == 0:
        return out
    return jnp.where((since_start >= lag)[..., None], out, 0)


def causal_conv(
    hist: jax.Array, since_start: jax.Array, weight: jax.Array, bias: jax.Array | None = None
) -> jax.Array:
    """Causal depthwise conv over time, float32 [B, T, C]: ``weight`` [K, C] (tap K-1 multiplies
    the current token, tap i the input K-1-i tokens back, as torch's Conv1d with padding K-1),
    ``hist`` [B, K-1+T, C]; taps before the document start read zero. Accumulates in float32."""
    k = weight.shape[0]
    w = weight.astype(F32)
    acc = 0.0
    for tap in range(k):
        acc = acc + lagged(hist, since_start, k - 1 - tap).astype(F32) * w[tap]
    if bias is not None:
        acc = acc + bias.astype(F32)
    return acc


def tail(
    hist: jax.Array, since_start: jax.Array, real: jax.Array, prev: jax.Array, n: int
) -> jax.Array:
    """The cache the call leaves: the ``n`` inputs [B, n, C] up to and including each row's last
    real token, zeros for those before that token's document start; a row with no real token
    keeps ``prev`` [B, n, C]. ``hist`` is [B, n+T, C] (``history`` with width n + 1)."""
    t = real.shape[1]
    length = jnp.max(jnp.where(real, jnp.arange(1, t + 1), 0), axis=1)  # [B] tokens up to last
    idx = length[:, None] + jnp.arange(n)  # indices into hist; call-relative: idx - n
    since = jnp.take_along_axis(since_start, jnp.maximum(length - 1, 0)[:, None], axis=1)
    valid = (idx - n) >= (length[:, None] - 1 - since)
    kept = jnp.take_along_axis(hist, idx[..., None], axis=1)
    kept = jnp.where(valid[..., None], kept, 0).astype(prev.dtype)
    return jnp.where((length > 0)[:, None, None], kept, prev)


def token_shift(
    x: jax.Array, info: SeqInfo, prev: jax.Array | None, cached: bool
) -> tuple[jax.Array, jax.Array]:
    """RWKV's token shift: (x_prev [B, T, C], last [B, C]). ``x_prev[t] = x[t-1]`` within a
    document, zeros at a document start; the first token of a cached call reads ``prev`` [B, C]
    (the cache; None: zeros) unless it starts its sequence. ``last`` is the cache to keep: x at
    each row's last real token (``prev`` for a row without one; zeros when ``prev`` is None)."""
    since = tokens_since_start(info, cached)
    before = None if prev is None else prev[:, None]
    hist = history(x, before, 2)
    keep = jnp.zeros_like(x[:, :1]) if prev is None else before
    last = tail(hist, since, info.segment_ids > 0, keep, 1)[:, 0]
    return lagged(hist, since, 1), last


# -- the token-shift state in the decode cache --------------------------------------------------

SHIFT_AXIS = "rwkv_shift"  # logical name of the shift state's channel axis (replicated)
SHIFT_RULES: dict[str, tuple[str, ...]] = {SHIFT_AXIS: ()}


class TokenShiftCache:
    """``init_cache`` / ``cache_axes`` of a channel mixer whose decode state is the previous
    token's input (RWKV's channel mixes): ``{"shift": [B, D]}``, the same size for any length.
    Sequence mixers that also keep a shift (RWKV's time mixes) add their own state to these."""

    @staticmethod
    def init_cache(cfg: Any, batch: int, length: int, dtype: Any) -> dict:
        del length
        return {"shift": jnp.zeros((batch, cfg.d_model), dtype)}

    @staticmethod
    def cache_axes() -> dict:
        return {"shift": ("cache_batch", SHIFT_AXIS)}


# -- initialisers -------------------------------------------------------------------------------


def dt_bias_init(dt_min: float, dt_max: float, floor: float) -> Initializer:
    """Inverse softplus of dt ~ log-uniform in [dt_min, dt_max] (floored), as Mamba does, so the
    initial step sizes ``softplus(bias)`` span that range."""

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
        lo, hi = math.log(dt_min), math.log(dt_max)
        dt = jnp.exp(jax.random.uniform(key, shape, F32) * (hi - lo) + lo)
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    """A = -exp(A_log) = -(1, 2, ..., n) along the last axis (S4D-real): Mamba-1's [Di, N]
    (per state entry), Mamba-2's [H] (per head, as HF initialises it)."""
    del key
    a_log = jnp.log(jnp.arange(1, shape[-1] + 1, dtype=F32))
    return jnp.broadcast_to(a_log, tuple(shape)).astype(dtype)


def uniform(bound: float) -> Initializer:
    """U(-bound, bound): a depthwise conv kernel (bound = 1/sqrt(K), torch's Conv1d default)
    or Mamba's dt projection (bound = 1/sqrt(dt_rank))."""

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
