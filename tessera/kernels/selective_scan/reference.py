"""The Mamba-1 selective scan in plain jnp: three forms of one recurrence (CPU path and oracle).

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t          h: [B, Di, N]
    y_t = C_t . h_t + D * x_t

Shapes: x, dt [B, T, Di]; A [Di, N]; B, C [B, T, N]; D [Di]; h0 [B, Di, N]; reset bool [B, T].
``reset`` is True at the first token of a packed document and zeroes the state before that token;
a token with dt = 0 and x = 0 leaves the state unchanged (padding). Every form computes in float32
and returns (y [B, T, Di] in x's dtype, the final state [B, Di, N] float32).

  sequential   lax.scan over time, O(B Di N) live state; the oracle and the decode step.
  associative  jax.lax.associative_scan over (decay, input) pairs; materialises [B, T, Di, N].
  chunked      associative scan within chunks of ``chunk_size``, lax.scan carrying the state
               across chunks; a custom VJP keeps one [B, Di, N] state per chunk (not
               [B, T, Di, N]) and runs the adjoint recurrence chunk by chunk in reverse,
               recomputing each chunk's states. Memory O(chunk). The training default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tessera.kernels import loops

Arrays = tuple[jax.Array, ...]


def _inputs(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    h0: jax.Array | None,
    reset: jax.Array | None,
) -> Arrays:
    """Float32 copies; h0 defaults to zeros; ``keep`` [B, T] float32 is 0 where the state resets."""
    f32 = jnp.float32
    b, t, di = x.shape
    h0 = jnp.zeros((b, di, A.shape[1]), f32) if h0 is None else h0.astype(f32)
    keep = jnp.ones((b, t), f32) if reset is None else 1.0 - reset.astype(f32)
    return (*(a.astype(f32) for a in (x, dt, A, B, C, D)), h0, keep)


def _terms(
    x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, keep: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Decay ``exp(dt A) * keep`` and input ``dt x B``, both [..., Di, N], for x, dt [..., Di],
    B [..., N], keep [...]: one step or a whole block of steps."""
    decay = jnp.exp(dt[..., None] * A) * keep[..., None, None]
    inp = (dt * x)[..., None] * B[..., None, :]
    return decay, inp


def _readout(h: jax.Array, C: jax.Array) -> jax.Array:
    """C . h over the state axis: h [..., Di, N], C [..., N] -> [..., Di] (elementwise, f32)."""
    return jnp.sum(h * C[..., None, :], axis=-1)


def _combine(first: tuple[jax.Array, jax.Array], second: tuple[jax.Array, jax.Array]):
    """Compose two affine maps h -> a h + b, ``first`` applied before ``second``."""
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2


def _block_states(
    h: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, keep: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Associative scan of a block [B, L, ...] from state h [B, Di, N]: (the per-step decays,
    the states after every step), both [B, L, Di, N]."""
    decay, inp = _terms(x, dt, A, B, keep)
    total_decay, total_inp = jax.lax.associative_scan(_combine, (decay, inp), axis=1)
    return decay, total_inp + total_decay * h[:, None]


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
    """One step at a time (lax.scan over T): y [B, T, Di], final state [B, Di, N] float32."""
    x32, dt, A, B, C, D, h, keep = _inputs(x, dt, A, B, C, D, h0, reset)

    def step(h: jax.Array, inputs: Arrays) -> tuple[jax.Array, jax.Array]:
        x_t, dt_t, B_t, C_t, keep_t = inputs
        decay, inp = _terms(x_t, dt_t, A, B_t, keep_t)
        h = decay * h + inp
        return h, _readout(h, C_t)

    time_major = tuple(jnp.moveaxis(a, 1, 0) for a in (x32, dt, B, C, keep))
    h, ys = jax.lax.scan(step, h, time_major)
    y = jnp.moveaxis(ys, 0, 1) + D * x32
    return y.astype(x.dtype), h


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
    """One associative scan over all T (memory [B, T, Di, N]): y [B, T, Di], final state."""
    x32, dt, A, B, C, D, h, keep = _inputs(x, dt, A, B, C, D, h0, reset)
    _, hs = _block_states(h, x32, dt, A, B, keep)
    return (_readout(hs, C) + D * x32).astype(x.dtype), hs[:, -1]


@jax.custom_vjp
def _scan_chunks(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    keep: jax.Array,
    h0: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Chunk-major float32 inputs x, dt [K, B, L, Di]; B, C [K, B, L, N]; keep [K, B, L]:
    (C.h [K, B, L, Di], final state [B, Di, N])."""
    return _scan_chunks_fwd(x, dt, A, B, C, keep, h0)[0]


def _scan_chunks_fwd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    keep: jax.Array,
    h0: jax.Array,
) -> tuple[tuple[jax.Array, jax.Array], Arrays]:
    def body(h: jax.Array, inputs: Arrays) -> tuple[jax.Array, Arrays]:
        x_c, dt_c, B_c, C_c, keep_c = inputs
        _, hs = _block_states(h, x_c, dt_c, A, B_c, keep_c)
        return hs[:, -1], (_readout(hs, C_c), h)

    h, (ys, starts) = loops.scan(body, h0, (x, dt, B, C, keep))
    # Residuals: the inputs and one state per chunk (the state entering it), never [T, Di, N].
    return (ys, h), (x, dt, A, B, C, keep, starts)


def _scan_chunks_bwd(residuals: Arrays, grads: tuple[jax.Array, jax.Array]) -> Arrays:
    """Chunks in reverse: recompute the chunk's states from the saved one, then run the adjoint
    recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} (g = dL/dh_t) as a reverse associative scan."""
    x, dt, A, B, C, keep, starts = residuals
    dys, dh_last = grads

    def body(carry: Arrays, inputs: Arrays) -> tuple[Arrays, Arrays]:
        dh_end, dA = carry
        x_c, dt_c, B_c, C_c, keep_c, h, dy = inputs
        decay, hs = _block_states(h, x_c, dt_c, A, B_c, keep_c)
        src = (dy[..., None] * C_c[:, :, None, :]).at[:, -1].add(dh_end)
        next_decay = jnp.concatenate([decay[:, 1:], jnp.ones_like(decay[:, :1])], axis=1)
        _, g = jax.lax.associative_scan(_combine, (next_decay, src), axis=1, reverse=True)
        h_prev = jnp.concatenate([h[:, None], hs[:, :-1]], axis=1)
        dz = g * h_prev * decay  # d/d(dt A) of the decay exp(dt A) * keep
        d_dtx = jnp.sum(g * B_c[:, :, None, :], axis=-1)  # the input is (dt x) B
        dB = jnp.sum(g * (dt_c * x_c)[..., None], axis=-2)
        dC = jnp.sum(dy[..., None] * hs, axis=-2)
        ddt = jnp.sum(dz * A, axis=-1) + d_dtx * x_c
        dA = dA + jnp.sum(dz * dt_c[..., None], axis=(0, 1))
        return (decay[:, 0] * g[:, 0], dA), (d_dtx * dt_c, ddt, dB, dC)

    carry = (dh_last, jnp.zeros_like(A))
    inputs = (x, dt, B, C, keep, starts, dys)
    (dh0, dA), (dx, ddt, dB, dC) = loops.scan(body, carry, inputs, reverse=True)
    return dx, ddt, dA, dB, dC, jnp.zeros_like(keep), dh0


_scan_chunks.defvjp(_scan_chunks_fwd, _scan_chunks_bwd)


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
    """Associative scan inside chunks of ``min(chunk_size, T)`` steps, state carried across
    chunks by lax.scan; T is padded internally with steps that leave the state unchanged."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    x32, dt, A, B, C, D, h, keep = _inputs(x, dt, A, B, C, D, h0, reset)
    b, t, di = x.shape
    size = min(chunk_size, t)
    num = -(-t // size)
    pad = num * size - t

    def chunks(a: jax.Array, fill: float = 0.0) -> jax.Array:
        """[B, T, ...] -> [num, B, size, ...], padded in time with ``fill``."""
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return jnp.moveaxis(a.reshape(b, num, size, *a.shape[2:]), 1, 0)

    # Padded steps have dt = 0 and keep = 1: they leave the state unchanged.
    ys, h = _scan_chunks(chunks(x32), chunks(dt), A, chunks(B), chunks(C), chunks(keep, 1.0), h)
    y = jnp.moveaxis(ys, 0, 1).reshape(b, num * size, di)[:, :t]
    return (y + D * x32).astype(x.dtype), h
