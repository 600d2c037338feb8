"""RWKV-7's generalised delta rule (a diagonal-plus-low-rank transition) in plain jnp.

Per batch row and head, with the state S_t a [K, V] matrix (key channels x value channels):

    S_t = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T r_t                                       (o_t[v] = sum_k r_t[k] S_t[k, v])

w is the log decay per key channel (<= 0; RWKV-7 keeps it in [-exp(-1/2), 0]), a and b the
low-rank vectors (RWKV-7: a = -kk, b = kk * iclr, with kk the unit-norm "removal key" and iclr the
in-context learning rate in (0, 1)). These are the semantics of fla's
``ops/generalized_delta_rule/dplr/naive.py::dplr_recurrence`` (alpha = a, beta = b, gk = w, its
fixed q scale d_k^-1/2 is our ``scale``) and of ``fla.ops.rwkv7.chunk_rwkv7`` (q = r); fla keeps
the state [N, H, K, V], so does tessera: S is K x V, the layout of the ``gla`` op.

Shapes: r, w, k, a, b [B, T, H, K]; v [B, T, H, V]; h0 [B, H, K, V] (default zeros). ``reset``
bool [B, T] zeroes the state before a token (the first token of a packed document). A token with
w = 0 and k = a = b = 0 (padding) leaves the state as it was. Every form returns
o [B, T, H, V] in v's dtype and the final state [B, H, K, V] in float32; all math is float32.

  sequential  lax.scan over time: the oracle, and the decode step.
  chunked     the chunk-parallel (WY / UT-transform) form, training and prefill path.

Derivation of the chunked form. Inside a chunk of L tokens entered with state S_0, let
G_i = w_1 + ... + w_i (inclusive cumulative log decay, per key channel) and
u_i = S_{i-1}^T a_i (the [V] row that the rank-one term writes back along b_i). Then
S_i = D_i S_{i-1} + b_i u_i^T + k_i v_i^T unrolls to

    S_i = exp(G_i) S_0 + sum_{j <= i} exp(G_i - G_j) (k_j v_j^T + b_j u_j^T)        (1)

and u_i, read from S_{i-1} = (1) at i - 1 (G_{i-1} = G_i - w_i), satisfies the lower-triangular
system

    u_i = (a_i exp(G_{i-1}))^T S_0 + sum_{j < i} [A_ak]_ij v_j + [A_ab]_ij u_j,
    [A_ak]_ij = sum_c a_i[c] k_j[c] exp(G_{i-1}[c] - G_j[c]),   A_ab likewise with b_j.

So (I - A_ab) u = A_ak v + W S_0 with W_i = a_i exp(G_{i-1}); inverting the unit lower
triangle (the UT transform: the chunk's product of DPLR transitions in WY form; computed by
`unit_lower_inverse` as a product of log2 L factors) gives u = U0 + Wt S_0 with
U0 = (I - A_ab)^-1 A_ak v and Wt = (I - A_ab)^-1 W, both independent of S_0, so they are computed
for all chunks at once. Outputs follow from (1):

    o_i / scale = (r_i exp(G_i))^T S_0 + sum_{j <= i} [A_rk]_ij v_j + [A_rb]_ij u_j,

with A_rk, A_rb like A_ak, A_ab but with r_i and exp(G_i - G_j) on j <= i. Between chunks a scan
carries only S: u = U0 + Wt S, S_L = exp(G_L) S + sum_j exp(G_L - G_j) (k_j v_j^T + b_j u_j^T).

Stability: every exponent above is a log-decay difference G_i - G_j with j <= i (or G_{i-1} - G_j
with j < i, or G_i from the chunk start), so it is <= 0: no exp(-G_j) is ever formed. Pairs that
are not causal, or that a reset separates, are masked to -inf before the exp, so neither the
forward nor the gradient meets inf or NaN. A reset before token i cuts every path from j to i
when a reset lies in (j, i]: with n = the running count of resets inside the chunk, a term from j
reaches i only where n_i == n_j, and S_0 reaches i only where n_i == 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tessera.kernels import loops

F32 = jnp.float32
DEFAULT_CHUNK = 16


def check_inputs(
    r: jax.Array,
    w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array | None,
    reset: jax.Array | None,
) -> None:
    """Raise ValueError naming the first argument whose shape does not fit r [B, T, H, K]."""
    if r.ndim != 4:
        raise ValueError(f"delta_rule: r must be [B, T, H, K]; got shape {r.shape}")
    bsz, t, h, dk = r.shape
    if v.ndim != 4 or v.shape[:3] != (bsz, t, h):
        raise ValueError(
            f"delta_rule: v shape {v.shape} does not fit r {r.shape}: want [B, T, H, V]"
        )
    for name, arr, want in (
        ("w", w, r.shape),
        ("k", k, r.shape),
        ("a", a, r.shape),
        ("b", b, r.shape),
        ("h0", h0, (bsz, h, dk, v.shape[3])),
        ("reset", reset, (bsz, t)),
    ):
        if arr is not None and tuple(arr.shape) != tuple(want):
            raise ValueError(f"delta_rule: {name} shape {tuple(arr.shape)}, want {tuple(want)}")


def _f32(*arrays: jax.Array | None) -> tuple[jax.Array | None, ...]:
    return tuple(None if x is None else x.astype(F32) for x in arrays)


def chunked_flops_per_token(size: int, dk: int, dv: int) -> float:
    """FLOPs per token and head of `chunked` as executed, chunks of ``size`` tokens: the four
    size x size score blocks over K channels and the products with them (size (12 K + 8 V)),
    the inverse of the unit lower triangle (2 (ceil(log2 size) - 1) size^3 matmuls per chunk) and
    the state work of the chunk pass (10 K V)."""
    doublings = max(math.ceil(math.log2(size)) - 1, 0) if size > 1 else 0
    return size * (12 * dk + 8 * dv) + 4 * doublings * size * size + 10 * dk * dv


def unit_lower_inverse(n: jax.Array) -> jax.Array:
    """(I - N)^-1 for strictly lower-triangular N [..., L, L]: N is nilpotent (N^L = 0), so the
    inverse is I + N + ... + N^(L-1) = (I + N)(I + N^2)(I + N^4)... with ceil(log2 L) factors:
    2 log2 L batched L x L matmuls (MXU work), no triangular-solve custom call (which XLA's CPU
    backend runs slowly in the backward pass)."""
    size = n.shape[-1]
    inverse = jnp.eye(size, dtype=n.dtype) + n
    power, span = n, 2
    while span < size:
        power = power @ power  # N^span
        inverse = inverse + power @ inverse
        span *= 2
    return inverse


def sequential(
    r: jax.Array,
    w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One step per token (lax.scan over T). Shapes in the module docstring."""
    check_inputs(r, w, k, v, a, b, h0, reset)
    bsz, _, h, dk = r.shape
    dv = v.shape[-1]
    rf, wf, kf, vf, af, bf, h0 = _f32(r, w, k, v, a, b, h0)
    h0 = jnp.zeros((bsz, h, dk, dv), F32) if h0 is None else h0
    keep = None if reset is None else ~reset

    def step(state, inp):
        r_t, w_t, k_t, v_t, a_t, b_t, keep_t = inp
        if keep_t is not None:
            state = jnp.where(keep_t[:, None, None, None], state, 0.0)
        sa = jnp.einsum("bhkv,bhk->bhv", state, a_t)
        state = (
            jnp.exp(w_t)[..., None] * state
            + b_t[..., None] * sa[:, :, None, :]
            + k_t[..., None] * v_t[:, :, None, :]
        )
        return state, scale * jnp.einsum("bhkv,bhk->bhv", state, r_t)

    xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (rf, wf, kf, vf, af, bf, keep))
    final, o = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), final


def chunked(
    r: jax.Array,
    w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    scale: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The chunk-parallel form of the module docstring, chunks of ``L = min(chunk_size, T)``
    tokens (default 16). T is zero-padded to a multiple of L (w = k = a = b = 0: the state is
    unchanged). Memory holds two [B, T, L, H, K] decay tensors per call."""
    check_inputs(r, w, k, v, a, b, h0, reset)
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"delta_rule: chunk_size must be positive, got {chunk_size}")
    bsz, t, h, dk = r.shape
    dv = v.shape[-1]
    size = min(chunk_size, t)
    chunks = -(-t // size)
    pad = chunks * size - t
    rf, wf, kf, vf, af, bf, h0 = _f32(r, w, k, v, a, b, h0)
    if reset is None:
        reset = jnp.zeros((bsz, t), bool)

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(bsz, chunks, size, *x.shape[2:])

    rc, wc, kc, vc, ac, bc = (split(x) for x in (rf, wf, kf, vf, af, bf))  # [b, c, l, h, *]
    n = jnp.cumsum(split(reset.astype(jnp.int32)), axis=2)  # resets so far in the chunk [b, c, l]
    g = jnp.cumsum(wc, axis=2)  # G_i, inclusive
    g_before = g - wc  # G_{i-1}
    same = n[:, :, :, None] == n[:, :, None, :]  # [b, c, i, j]

    def decay(upper: jax.Array, diagonal: int) -> jax.Array:
        """exp(upper_i - G_j) [b, c, i, j, h, k] where j <= i + diagonal and no reset parts them."""
        keep = jnp.tril(jnp.ones((size, size), bool), diagonal) & same
        diff = upper[:, :, :, None] - g[:, :, None, :]
        return jnp.exp(jnp.where(keep[..., None, None], diff, -jnp.inf))

    def scores(left: jax.Array, right: jax.Array, dec: jax.Array) -> jax.Array:
        return jnp.einsum("bcihk,bcjhk,bcijhk->bchij", left, right, dec)

    incl, strict = decay(g, 0), decay(g_before, -1)
    a_rk, a_rb = scores(rc, kc, incl), scores(rc, bc, incl)
    a_ak, a_ab = scores(ac, kc, strict), scores(ac, bc, strict)
    from_start = (n == 0)[..., None, None]
    w_in = ac * jnp.exp(jnp.where(from_start, g_before, -jnp.inf))  # W_i [b, c, l, h, k]
    r_in = rc * jnp.exp(jnp.where(from_start, g, -jnp.inf))

    # The UT transform: [U0 | Wt] = (I - A_ab)^-1 [A_ak v | W].
    inverse = unit_lower_inverse(a_ab)
    u0 = jnp.einsum("bchij,bchjm,bcmhv->bchiv", inverse, a_ak, vc)  # [b, c, h, l, v]
    wt = jnp.einsum("bchij,bcjhk->bchik", inverse, w_in)  # [b, c, h, l, k]

    # To the chunk's end: exp(G_L - G_j) where no reset follows j; exp(G_L) from the start.
    last = n[:, :, -1:]
    to_end = jnp.exp(jnp.where((n == last)[..., None, None], g[:, :, -1:] - g, -jnp.inf))
    through = jnp.exp(jnp.where((last == 0)[..., None], g[:, :, -1], -jnp.inf))  # [b, c, h, k]
    k_end, b_end = kc * to_end, bc * to_end
    own = jnp.einsum("bclhk,bclhv->bchkv", k_end, vc) + jnp.einsum("bclhk,bchlv->bchkv", b_end, u0)

    def step(state, inp):
        through_c, own_c, wt_c, b_end_c = inp
        u = jnp.einsum("bhlk,bhkv->bhlv", wt_c, state)
        new = through_c[..., None] * state + own_c + jnp.einsum("blhk,bhlv->bhkv", b_end_c, u)
        return new, state

    start = jnp.zeros((bsz, h, dk, dv), F32) if h0 is None else h0
    xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (through, own, wt, b_end))
    final, incoming = loops.scan(step, start, xs)
    incoming = jnp.moveaxis(incoming, 0, 1)  # [b, c, h, k, v]

    o = jnp.einsum("bchij,bcjhv->bchiv", a_rk, vc) + jnp.einsum("bchij,bchjv->bchiv", a_rb, u0)
    r_eff = jnp.moveaxis(r_in, 2, 3) + jnp.einsum("bchij,bchjk->bchik", a_rb, wt)
    o = o + jnp.einsum("bchik,bchkv->bchiv", r_eff, incoming)
    o = scale * jnp.moveaxis(o, 3, 2).reshape(bsz, chunks * size, h, dv)[:, :t]
    return o.astype(v.dtype), final
