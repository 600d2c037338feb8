"""Mamba-2 state-space recurrence (SSD) in plain jnp: sequential, associative and chunked forms.

Per batch row and head h, with a scalar decay per head and step:

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t (outer) B_t          h_t: [P, N]
    y_t = h_t . C_t + D_h * x_t

Shapes: x [B, T, H, P], dt [B, T, H], A [H], B and C [B, T, G, N] (head h reads group
h // (H / G)), D [H], h0 [B, H, P, N] (default zeros). ``reset`` bool [B, T] zeroes the state
before a token (the first token of a packed document); a token with dt = 0 and x = 0 (padding)
leaves the state as it was. Every form returns y [B, T, H, P] in x's dtype and the final state
[B, H, P, N] in float32; all math is float32.

  sequential   lax.scan over time: the oracle, and the decode step.
  associative  lax.associative_scan over (decay, input) pairs; O(T log T) work, [B, T, H, P, N]
               memory.
  chunked      the state-space-duality algorithm (training default): inside each chunk of L
               tokens the quadratic "attention-like" form with the decay matrix
               exp(s_i - s_j) (s = cumulative log-decay) on the causal triangle; chunk-end states
               passed between chunks by a scan; the incoming state's contribution added per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tessera.kernels import loops

F32 = jnp.float32


def check_inputs(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    h0: jax.Array | None,
    reset: jax.Array | None,
) -> None:
    """Raise ValueError naming the first argument whose shape does not fit x [B, T, H, P]."""
    if x.ndim != 4:
        raise ValueError(f"ssd: x must be [B, T, H, P]; got shape {x.shape}")
    b, t, h, p = x.shape
    if B.ndim != 4 or B.shape[:2] != (b, t):
        raise ValueError(f"ssd: B shape {B.shape} does not fit x {x.shape}: want [B, T, G, N]")
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"ssd: heads ({h}) must be a multiple of groups ({g})")
    for name, arr, want in (
        ("dt", dt, (b, t, h)),
        ("A", A, (h,)),
        ("C", C, (b, t, g, n)),
        ("D", D, (h,)),
        ("h0", h0, (b, h, p, n)),
        ("reset", reset, (b, t)),
    ):
        if arr is not None and tuple(arr.shape) != want:
            raise ValueError(f"ssd: {name} shape {tuple(arr.shape)}, want {want}")


def _decay(dt: jax.Array, A: jax.Array, reset: jax.Array | None) -> jax.Array:
    """Per-step decay exp(dt * A) [B, T, H], 0 at resets."""
    decay = jnp.exp(dt * A)
    return decay if reset is None else jnp.where(reset[..., None], 0.0, decay)


def _per_head(a: jax.Array, heads: int) -> jax.Array:
    """[B, T, G, N] -> [B, T, H, N]: head h reads group h // (H / G)."""
    return jnp.repeat(a, heads // a.shape[2], axis=2)


def _f32(*arrays: jax.Array | None) -> tuple[jax.Array | None, ...]:
    return tuple(None if a is None else a.astype(F32) for a in arrays)


def sequential(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    *,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One step per token (lax.scan over T). Shapes in the module docstring."""
    check_inputs(x, dt, A, B, C, D, h0, reset)
    b, _, h, p = x.shape
    n = B.shape[-1]
    xf, dt, A, B, C, D, h0 = _f32(x, dt, A, B, C, D, h0)
    h0 = jnp.zeros((b, h, p, n), F32) if h0 is None else h0
    decay = _decay(dt, A, reset)
    inputs = (xf * dt[..., None], decay, _per_head(B, h), _per_head(C, h))

    def step(state, inp):
        xdt_t, decay_t, b_t, c_t = inp
        state = decay_t[..., None, None] * state + xdt_t[..., None] * b_t[:, :, None, :]
        return state, jnp.einsum("bhpn,bhn->bhp", state, c_t)

    final, ys = jax.lax.scan(step, h0, jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), inputs))
    y = jnp.moveaxis(ys, 0, 1) + D[:, None] * xf
    return y.astype(x.dtype), final


def associative(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    *,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Parallel prefix scan over time of the affine maps h -> decay_t * h + u_t."""
    check_inputs(x, dt, A, B, C, D, h0, reset)
    h = x.shape[2]
    xf, dt, A, B, C, D, h0 = _f32(x, dt, A, B, C, D, h0)
    decay = _decay(dt, A, reset)
    u = (xf * dt[..., None])[..., None] * _per_head(B, h)[:, :, :, None, :]  # [B, T, H, P, N]
    if h0 is not None:
        u = u.at[:, 0].add(decay[:, 0, :, None, None] * h0)

    def combine(first, second):
        d1, u1 = first
        d2, u2 = second
        return d1 * d2, d2[..., None, None] * u1 + u2

    _, states = jax.lax.associative_scan(combine, (decay, u), axis=1)
    y = jnp.einsum("bthpn,bthn->bthp", states, _per_head(C, h)) + D[:, None] * xf
    return y.astype(x.dtype), states[:, -1]


def chunked(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    *,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """State-space duality: quadratic form inside chunks of ``L = min(chunk_size, T)`` tokens,
    recurrence between them. T is zero-padded to a multiple of L (dt = 0: the state is unchanged).

    Resets never enter the log-decays: ``r`` counts the resets seen so far in the chunk, and a
    decay from token j to token i >= j exists only where ``r_i == r_j`` (no reset in (j, i]).
    Every exp is of a masked log-decay that is <= 0 where kept and -inf elsewhere, so neither the
    forward nor the gradient meets inf or NaN.
    """
    check_inputs(x, dt, A, B, C, D, h0, reset)
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be positive, got {chunk_size}")
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    r_per_g = h // g
    size = min(chunk_size, t)
    chunks = -(-t // size)
    pad = chunks * size - t
    xf, dt, A, B, C, D, h0 = _f32(x, dt, A, B, C, D, h0)
    if reset is None:
        reset = jnp.zeros((b, t), bool)

    def split(a: jax.Array, *tail: int) -> jax.Array:
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, chunks, size, *tail)

    xc = split(xf, g, r_per_g, p)  # [b, c, l, g, r, p]
    dtc = split(dt, g, r_per_g)  # [b, c, l, g, r]
    bc, cc = split(B, g, n), split(C, g, n)  # [b, c, l, g, n]
    resets = jnp.cumsum(split(reset.astype(jnp.int32)), axis=2)  # [b, c, l]
    logd = jnp.cumsum(dtc * A.reshape(g, r_per_g), axis=2)  # s: [b, c, l, g, r]
    xdt = xc * dtc[..., None]

    # 1. Inside each chunk: y_i += sum_{j <= i} (C_i . B_j) exp(s_i - s_j) dt_j x_j.
    causal = jnp.tril(jnp.ones((size, size), bool))
    keep = causal & (resets[:, :, :, None] == resets[:, :, None, :])  # [b, c, i, j]
    diff = logd[:, :, :, None] - logd[:, :, None, :]  # [b, c, i, j, g, r]
    decay = jnp.exp(jnp.where(keep[..., None, None], diff, -jnp.inf))
    scores = jnp.einsum("bcign,bcjgn->bcijg", cc, bc)
    y = jnp.einsum("bcijgr,bcjgrp->bcigrp", scores[..., None] * decay, xdt)

    # 2. Each chunk's own end state (from zero): sum_j exp(s_last - s_j) dt_j x_j (outer) B_j.
    last_logd, last_resets = logd[:, :, -1:], resets[:, :, -1:, None, None]
    to_end = jnp.exp(jnp.where(resets[..., None, None] == last_resets, last_logd - logd, -jnp.inf))
    own = jnp.einsum("bclgr,bclgrp,bclgn->bcgrpn", to_end, xdt, bc)
    through = jnp.exp(jnp.where(last_resets[:, :, 0] == 0, last_logd[:, :, 0], -jnp.inf))

    # 3. Between chunks: incoming_{c+1} = through_c * incoming_c + own_c.
    def step(state, inp):
        through_c, own_c = inp
        return through_c[..., None, None] * state + own_c, state

    start = jnp.zeros((b, g, r_per_g, p, n), F32) if h0 is None else h0.reshape(b, g, r_per_g, p, n)
    final, incoming = loops.scan(
        step, start, (jnp.moveaxis(through, 1, 0), jnp.moveaxis(own, 1, 0))
    )
    incoming = jnp.moveaxis(incoming, 0, 1)  # [b, c, g, r, p, n]

    # 4. The incoming state's share of each output: exp(s_i) C_i . incoming, up to a reset.
    from_start = jnp.exp(jnp.where(resets[..., None, None] == 0, logd, -jnp.inf))
    y = y + jnp.einsum("bclgn,bcgrpn->bclgrp", cc, incoming) * from_start[..., None]
    y = y + D.reshape(g, r_per_g, 1) * xc
    y = y.reshape(b, chunks * size, h, p)[:, :t]
    return y.astype(x.dtype), final.reshape(b, h, p, n)
