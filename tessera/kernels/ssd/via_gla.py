"""SSD as a scalar-decay gated linear recurrence: any `gla` impl becomes an `ssd` impl.

Mamba-2's recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t (outer) B_t, y_t = h_t . C_t + D x_t is
the `gla` recurrence S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t with

    q = C (per head), k = B (per head), v = dt x, g = dt A (one scalar per head),  S = h^T

(S [N, P] is the transpose of SSD's state [P, N]) plus the skip D x. Resets carry over as they
are. So the Pallas GLA kernels (scalar decay) serve SSD too: ``via_gla(kernel)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tessera.kernels.ssd.reference import check_inputs

F32 = jnp.float32


def via_gla(gla_fn: Callable[..., tuple[jax.Array, jax.Array]]) -> Callable[..., tuple]:
    """An `ssd` impl (the arguments of `tessera.kernels.ssd.ssd`, less ``impl``) running
    ``gla_fn`` (an impl taking the arguments of `tessera.kernels.gla.gla`, less ``impl``)."""

    def impl(
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
        q, k, v, g, h0_gla = as_gla(x, dt, A, B, C, D, h0=h0, reset=reset)
        o, state = gla_fn(
            q, k, v, g, u=None, h0=h0_gla, reset=reset, scale=1.0, chunk_size=chunk_size
        )
        return from_gla(o, state, x, D)

    impl.__name__ = f"ssd_via_{getattr(gla_fn, '__name__', 'gla')}"
    return impl


def as_gla(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    *,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """SSD's arguments as `gla`'s: (q [B, T, H, N], k [B, T, H, N], v [B, T, H, P] float32,
    g [B, T, H] float32, h0 [B, H, N, P] or None)."""
    check_inputs(x, dt, A, B, C, D, h0, reset)
    heads, groups = x.shape[2], B.shape[2]

    def per_head(a: jax.Array) -> jax.Array:  # head h reads group h // (H / G)
        return jnp.repeat(a, heads // groups, axis=2)

    return per_head(C), per_head(B), *gla_values(x, dt, A, h0)


def gla_values(
    x: jax.Array, dt: jax.Array, A: jax.Array, h0: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The head-wise part of `as_gla` (checked inputs): v = dt x [B, T, H, P], g = dt A
    [B, T, H] (float32) and h0 as the gla state [B, H, N, P] (or None)."""
    dt = dt.astype(F32)
    v = x.astype(F32) * dt[..., None]
    g = dt * A.astype(F32)
    return v, g, None if h0 is None else jnp.swapaxes(h0.astype(F32), -1, -2)


def from_gla(
    o: jax.Array, state: jax.Array, x: jax.Array, D: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """gla's (o, final state) as SSD's: y = o + D x in x's dtype, the state [B, H, P, N]."""
    y = o + D.astype(F32)[:, None] * x.astype(F32)
    return y.astype(x.dtype), jnp.swapaxes(state, -1, -2)
