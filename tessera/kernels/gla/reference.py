"""Gated linear recurrence (GLA / RetNet / RWKV-6 WKV) in plain jnp: sequential, chunked and
parallel forms.

Per batch row and head, with state S [K, V] and a log decay g_t <= 0 (float32) that is either
per channel (g [B, T, H, K]: GLA, RWKV-6) or one scalar per head (g [B, T, H]: RetNet):

  without u (inclusive: GLA, RetNet)
      S_t = diag(exp g_t) S_{t-1} + k_t^T v_t                      o_t = scale * q_t S_t
  with u [H, K] (RWKV-6's "bonus" for the current token; fla's ops/rwkv6/recurrent_naive.py)
      o_t = scale * q_t (S_{t-1} + diag(u) k_t^T v_t)              S_t as above

Shapes: q, k [B, T, H, K], v [B, T, H, V], h0 [B, H, K, V] (default zeros). ``reset`` bool
[B, T] zeroes the state before a token (the first token of a packed document); a token with
k = v = 0 and g = 0 (padding) leaves the state as it was. Every form returns o [B, T, H, V] in
v's dtype and the final state [B, H, K, V] in float32; all math is float32.

  sequential   lax.scan over time: the oracle, and the decode step.
  chunked      state passed between chunks of L tokens by a scan; inside a chunk the exact
               quadratic form with the decay matrix exp(sum_{j < s <= i} g_s) (s < i with u)
               on the causal triangle: [L, L, K] per head for per-channel g, [L, L] for
               scalar g.
  parallel     the same quadratic form over the whole sequence as one chunk (O(T^2) memory).

Stability: only sums of log decays (<= 0) are ever exponentiated, masked to -inf BEFORE the exp
(never exp of a positive number, never inf * 0), so per-step log decays of -20 (or -1e3) give
finite values and gradients in float32. Each exponent is summed directly over the steps it spans
(a segment sum), not taken as the difference of two long cumulative sums, so its rounding error
is relative to itself and strong decays lose no accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tessera.kernels import loops

F32 = jnp.float32

# Default chunk lengths. Per-channel g materialises the decay tensor [L, L, K] per chunk and
# head (its segment sums and exps), i.e. L * K floats per token: L = 16 keeps that at 16x the
# size of q while the between-chunk scan still runs only T / 16 steps. Scalar g needs only
# [L, L] per head, so the chunk can be as long as SSD's (64): intra-chunk matmuls of L x (K + V)
# per token, and 4x fewer state updates of K x V.
CHUNK_PER_CHANNEL = 16
CHUNK_SCALAR = 64


def check_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    u: jax.Array | None,
    h0: jax.Array | None,
    reset: jax.Array | None,
) -> None:
    """Raise ValueError naming the first argument whose shape does not fit q [B, T, H, K]."""
    if q.ndim != 4:
        raise ValueError(f"gla: q must be [B, T, H, K]; got shape {q.shape}")
    b, t, h, dk = q.shape
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(
            f"gla: v shape {tuple(v.shape)} does not fit q {q.shape}: want [B, T, H, V]"
        )
    if tuple(g.shape) not in ((b, t, h), (b, t, h, dk)):
        raise ValueError(f"gla: g shape {tuple(g.shape)}, want {(b, t, h, dk)} or {(b, t, h)}")
    for name, arr, want in (
        ("k", k, (b, t, h, dk)),
        ("u", u, (h, dk)),
        ("h0", h0, (b, h, dk, v.shape[3])),
        ("reset", reset, (b, t)),
    ):
        if arr is not None and tuple(arr.shape) != want:
            raise ValueError(f"gla: {name} shape {tuple(arr.shape)}, want {want}")


def default_chunk_size(g: jax.Array) -> int:
    """CHUNK_SCALAR for scalar g [B, T, H], CHUNK_PER_CHANNEL for per-channel g."""
    return CHUNK_SCALAR if g.ndim == 3 else CHUNK_PER_CHANNEL


def _prepare(q, k, v, g, u, h0):
    """float32 copies; g as [B, T, H, K or 1] so scalar decays broadcast over K."""
    q, k, v, g = (a.astype(F32) for a in (q, k, v, g))
    g = g[..., None] if g.ndim == 3 else g
    u = None if u is None else u.astype(F32)
    b, _, h, dk = q.shape
    h0 = jnp.zeros((b, h, dk, v.shape[-1]), F32) if h0 is None else h0.astype(F32)
    return q, k, v, g, u, h0


def sequential(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    u: jax.Array | None = None,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One step per token (lax.scan over T). Shapes in the module docstring."""
    check_inputs(q, k, v, g, u, h0, reset)
    out_dtype = v.dtype
    q, k, v, g, u, h0 = _prepare(q, k, v, g, u, h0)
    if reset is None:
        reset = jnp.zeros(q.shape[:2], bool)

    def step(state, inp):
        q_t, k_t, v_t, g_t, reset_t = inp
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        kv = k_t[..., None] * v_t[..., None, :]  # [B, H, K, V]
        if u is None:
            state = jnp.exp(g_t)[..., None] * state + kv
            return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t, state + u[..., None] * kv)
        return jnp.exp(g_t)[..., None] * state + kv, o_t

    inputs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (q, k, v, g, reset))
    final, o = jax.lax.scan(step, h0, inputs)
    return (scale * jnp.moveaxis(o, 0, 1)).astype(out_dtype), final


def chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    u: jax.Array | None = None,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    scale: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact quadratic form inside chunks of ``L = min(chunk_size, T)`` tokens (default
    `default_chunk_size`), recurrence between them. T is zero-padded to a multiple of L
    (k = v = 0, g = 0: the state is unchanged).

    Resets never enter the log decays: ``r`` counts the resets seen so far in the chunk, and a
    decay from token j to token i exists only where ``r_i == r_j`` (no reset in (j, i]).
    """
    check_inputs(q, k, v, g, u, h0, reset)
    size = default_chunk_size(g) if chunk_size is None else chunk_size
    if size < 1:
        raise ValueError(f"gla: chunk_size must be positive, got {size}")
    out_dtype = v.dtype
    b, t, h, _ = q.shape
    size = min(size, t)
    chunks = -(-t // size)
    pad = chunks * size - t
    q, k, v, g, u, h0 = _prepare(q, k, v, g, u, h0)
    if reset is None:
        reset = jnp.zeros((b, t), bool)

    def split(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, chunks, size, *a.shape[2:])

    qc, kc, vc, gc = split(q), split(k), split(v), split(g)  # [b, c, l, h, k|v|kg]
    r = jnp.cumsum(split(reset.astype(jnp.int32)), axis=2)  # [b, c, l]
    # Every log decay below is a direct sum of the g's it spans (never a difference of two long
    # cumulative sums, which would lose ~ulp(sum) of absolute precision to cancellation).
    prefix = jnp.cumsum(gc, axis=2)  # sum_{s <= i} g_s
    suffix = jnp.flip(jnp.cumsum(jnp.flip(gc, 2), axis=2), 2)  # sum_{s >= j} g_s
    suffix = jnp.pad(suffix[:, :, 1:], [(0, 0), (0, 0), (0, 1)] + [(0, 0)] * (gc.ndim - 3))
    # seg[i, j] = sum_{j < s <= i} g_s (0 on and above the diagonal); with the bonus the query
    # reads the state before its own token: sum_{j < s < i} g_s = seg[i - 1, j].
    below = jnp.tril(jnp.ones((size, size), bool), -1)[..., None, None]  # [i, j, 1, 1]
    seg = jnp.cumsum(jnp.where(below, gc[:, :, :, None], 0.0), axis=2)  # [b, c, i, j, h, kg]
    if u is None:
        from_start = prefix
    else:
        shift = [(0, 0), (0, 0), (1, 0)] + [(0, 0)] * (gc.ndim - 3)
        from_start = jnp.pad(prefix, shift)[:, :, :-1]
        seg = jnp.pad(seg, shift + [(0, 0)])[:, :, :-1]

    # 1. Inside each chunk: o_i += sum_{j <= i (j < i with u)} (q_i . exp(seg_ij) . k_j) v_j.
    tri = jnp.tril(jnp.ones((size, size), bool), 0 if u is None else -1)
    keep = tri & (r[:, :, :, None] == r[:, :, None, :])  # [b, c, i, j]
    decay = jnp.exp(jnp.where(keep[..., None, None], seg, -jnp.inf))
    if gc.shape[-1] == 1:  # scalar decay: an [L, L] matrix per head
        scores = jnp.einsum("bcihk,bcjhk->bcijh", qc, kc) * decay[..., 0]
    else:
        scores = jnp.einsum("bcihk,bcjhk,bcijhk->bcijh", qc, kc, decay)
    o = jnp.einsum("bcijh,bcjhv->bcihv", scores, vc)
    if u is not None:  # the current token's bonus term
        o = o + jnp.einsum("bclhk,hk,bclhk->bclh", qc, u, kc)[..., None] * vc

    # 2. Each chunk's own end state (from zero): sum_j exp(sum_{s > j} g_s) k_j^T v_j.
    last_r = r[:, :, -1:, None, None]
    to_end = jnp.exp(jnp.where(r[..., None, None] == last_r, suffix, -jnp.inf))
    own = jnp.einsum("bclhk,bclhv->bchkv", kc * to_end, vc)
    total = prefix[:, :, -1]  # [b, c, h, kg]
    through = jnp.exp(jnp.where(last_r[:, :, 0] == 0, total, -jnp.inf))

    # 3. Between chunks: incoming_{c+1} = diag(through_c) incoming_c + own_c.
    def step(state, inp):
        through_c, own_c = inp
        return through_c[..., None] * state + own_c, state

    final, incoming = loops.scan(step, h0, (jnp.moveaxis(through, 1, 0), jnp.moveaxis(own, 1, 0)))
    incoming = jnp.moveaxis(incoming, 0, 1)  # [b, c, h, k, v]

    # 4. The incoming state's share of each output: (q_i . exp(from_start_i)) incoming, up to a
    # reset.
    from_start = jnp.exp(jnp.where(r[..., None, None] == 0, from_start, -jnp.inf))
    o = o + jnp.einsum("bclhk,bchkv->bclhv", qc * from_start, incoming)
    o = (scale * o).reshape(b, chunks * size, h, -1)[:, :t]
    return o.astype(out_dtype), final


def parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    u: jax.Array | None = None,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """The quadratic form over the whole sequence: `chunked` with one chunk of T tokens."""
    return chunked(q, k, v, g, u=u, h0=h0, reset=reset, scale=scale, chunk_size=q.shape[1])
