"""Pallas GPU (Triton) kernels for the gated linear recurrence (`tessera.kernels.gla`), forward
and backward; through `tessera.kernels.ssd.via_gla` also Mamba-2's SSD.

Layout: the wrapper moves heads before time and pads: q, k [B, H, Tp, Kp], v [B, H, Tp, Vp],
g [B, H, Tp, Kp] (per channel) or [B, H, Tp] (scalar per head), with Kp, Vp the head dims
rounded up to a power of two >= 16 (Triton's block shapes are powers of two; its dots need
every dimension >= 16) and Tp = T rounded up to a multiple of the chunk length L (16 per
channel, 32 scalar). Padding is zeros: padded channels of q, k carry a zero state row, padded
tokens (k = v = 0, g = 0) leave the state unchanged. ``reset`` enters as ``r`` [B, Tp] int32,
the number of resets seen so far inside each chunk (a cumsum done by XLA outside).

Grid (B, H): one program per batch row and head; it loops over the Tp / L chunks with
``lax.fori_loop`` (Triton has no sequential grid axis to keep a state in scratch), the state
S [Kp, Vp] float32 carried in registers, each chunk's tokens read and written by ``pl.ds``
slices. Per chunk, with r_i the in-chunk reset count and "j ~ i" meaning r_i == r_j (no reset
in (j, i]):

  seg[i, j] = sum_{j < s <= i} g_s   (s < i with the bonus u)    log decay from token j to i
  fs[i]     = sum_{s <= i} g_s       (s < i with u)              from the chunk start to i
  te[j]     = sum_{s > j} g_s                                    from j to the chunk end
  tot       = sum_s g_s

each summed directly over the steps it spans by an in-kernel loop over s (exact segment sums as
in `reference.chunked`, never a difference of prefix sums), then masked to -inf BEFORE the exp
(only sums of log decays <= 0 are exponentiated):

  D = exp(seg masked to j <= i (j < i with u), j ~ i)    [L, L, Kp] (per channel) or [L, L]
  A[i, j] = sum_k q_ik k_jk D_ijk                        (scalar: (q k^T) * D, a dot)
  o = scale * (A v + [u] (q_i . u . k_i) v_i + (q * exp(fs masked to r_i = 0)) S)
  S <- exp(tot masked to r_last = 0) * S + (k * exp(te masked to r_j = r_last))^T v

The forward saves each chunk's incoming state S_c (float32 [B, H, Tp / L, Kp, Vp] in HBM: one
state per chunk, not per token). The backward kernel (same grid) walks the chunks in reverse,
carrying dS (the gradient of the state leaving the chunk, starting from the final state's
gradient), recomputes the chunk's decays from g and its incoming state from the saved one,
and differentiates the four lines above; dg_s gathers the gradients of every segment sum that
spans step s (another loop over s). du is summed per (batch, head) and over batch outside.

All math is float32 (bf16 / f16 inputs are cast after the load). The kernel's dots (q k^T for
scalar decays, A v, the state reads and updates) run at Triton's default dot precision, TF32 on
Ampere and later, as `tessera.kernels.attention.gpu`'s pallas_gpu does: auto passes the kernel
over for float32 inputs when ``jax_default_matmul_precision`` asks for full float32 (it runs
when named). The log-decay sums never go through a dot: they are exact float32 additions.
Runs on a GPU, and anywhere in Pallas interpret mode (the CPU tests). Under an active mesh the
kernel runs per shard (``shard_map_kernel``: batch and heads split, the sequence gathered).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tessera.kernels.gla.reference import check_inputs
from tessera.kernels.platform import interpret, kernel_platform_reason, tf32_reason
from tessera.sharding.context import active
from tessera.sharding.kernels import shard_map_kernel

F32 = jnp.float32
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
CHUNK_PER_CHANNEL = 16  # [L, L, Kp] decay tensors per chunk: keep L small
CHUNK_SCALAR = 32  # [L, L] decays; L also the dots' row count
MIN_DIM = 16  # Triton's dot needs every dimension >= 16
MAX_HEAD_DIM = 256  # the state [Kp, Vp] and the [L, L, Kp] decays live in registers
NUM_WARPS = 4


def padded_dim(d: int) -> int:
    """A head dim as the kernel holds it: the next power of two, at least 16."""
    return max(MIN_DIM, 1 << (d - 1).bit_length())


def chunk_length(g: jax.Array) -> int:
    """The kernel's chunk length: CHUNK_SCALAR for scalar g [B, T, H], else CHUNK_PER_CHANNEL."""
    return CHUNK_SCALAR if g.ndim == 3 else CHUNK_PER_CHANNEL


def supports(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, u=None, h0=None,
             reset=None, **_) -> str | None:
    """None when the kernel runs these inputs (on a GPU or in GPU interpret mode), else why not."""
    reason = kernel_platform_reason("gpu")
    if reason is not None:
        return reason
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.dtype not in DTYPES:
            return f"{name} dtype {a.dtype} (float32 / bfloat16 / float16)"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]}, {v.shape[-1]} (the kernel takes up to {MAX_HEAD_DIM})"
    return None


def auto_skips(q: jax.Array, *args, **kwargs) -> str | None:
    """Why auto passes the kernel over: a single token (the decode step), or float32 inputs when
    full-precision dots were asked for (the kernel's dots run at TF32)."""
    if q.shape[1] == 1:
        return f"T = {q.shape[1]} (the decode step: the sequential form)"
    return tf32_reason(q)


# --------------------------------------------------------------------------------------------
# In-kernel pieces (shapes for one chunk of L tokens; gs = (Kp,) per channel, () scalar)


def _expand(mask: jax.Array, scalar: bool) -> jax.Array:
    """A mask over tokens broadcast over the decay's channel axis (none for scalar g)."""
    return mask if scalar else mask[..., None]


def _row(x: jax.Array, s: jax.Array) -> jax.Array:
    """Row s of x [L, ...] (a select and a sum of zeros: exact, no dynamic register index)."""
    hit = jnp.arange(x.shape[0]) == s
    return jnp.sum(jnp.where(hit.reshape(hit.shape + (1,) * (x.ndim - 1)), x, 0.0), axis=0)


def _decay_sums(g: jax.Array, bonus: bool, scalar: bool):
    """seg [L, L, *gs], fs [L, *gs], te [L, *gs] (module docstring), each summed step by step
    over the steps it spans, and tot [*gs]."""
    size = g.shape[0]
    i = jnp.arange(size)[:, None]
    j = jnp.arange(size)[None, :]
    t = jnp.arange(size)

    def add(s, carry):
        seg, fs, te = carry
        g_s = _row(g, s)
        in_seg = (j < s) & ((s < i) if bonus else (s <= i))
        in_fs = (s < t) if bonus else (s <= t)
        seg = seg + jnp.where(_expand(in_seg, scalar), g_s, 0.0)
        fs = fs + jnp.where(_expand(in_fs, scalar), g_s, 0.0)
        te = te + jnp.where(_expand(t < s, scalar), g_s, 0.0)
        return seg, fs, te

    zeros = jnp.zeros((size, *g.shape[1:]), F32)
    seg, fs, te = jax.lax.fori_loop(
        0, size, add, (jnp.zeros((size, *g.shape), F32), zeros, zeros)
    )
    return seg, fs, te, jnp.sum(g, axis=0)


def _chunk_decays(g: jax.Array, r: jax.Array, bonus: bool, scalar: bool):
    """The chunk's masked exponentials: D [L, L, *gs], Ef [L, *gs], Et [L, *gs], Dt [*gs]."""
    seg, fs, te, tot = _decay_sums(g, bonus, scalar)
    size = g.shape[0]
    i = jnp.arange(size)[:, None]
    j = jnp.arange(size)[None, :]
    causal = (j < i) if bonus else (j <= i)
    keep = causal & (r[:, None] == r[None, :])
    r_last = jnp.max(r)  # counts never decrease along the chunk
    neg = -jnp.inf
    decay = jnp.exp(jnp.where(_expand(keep, scalar), seg, neg))
    e_from = jnp.exp(jnp.where(_expand(r == 0, scalar), fs, neg))
    e_to = jnp.exp(jnp.where(_expand(r == r_last, scalar), te, neg))
    e_through = jnp.exp(jnp.where(r_last == 0, tot, neg))
    return decay, e_from, e_to, e_through


def _cols(x: jax.Array, scalar: bool) -> jax.Array:
    """A per-token factor [L, *gs] broadcast against [L, Kp] rows."""
    return x[:, None] if scalar else x


def _state_rows(x: jax.Array, scalar: bool) -> jax.Array:
    """A per-channel factor [*gs] broadcast against the state [Kp, Vp]."""
    return x if scalar else x[:, None]


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b)


def _scores(q, k, decay, scalar):
    """A[i, j] = sum_k q_ik k_jk D_ijk."""
    if scalar:
        return _dot(q, k, trans_b=True) * decay
    return jnp.sum(q[:, None, :] * k[None, :, :] * decay, axis=2)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, r_ref, u_ref, h0_ref, o_ref, final_ref, states_ref,
                *, size: int, bonus: bool, scalar: bool, scale: float):
    chunks = states_ref.shape[0]
    u = u_ref[...].astype(F32)

    def body(c, state):
        rows = pl.ds(c * size, size)
        q = q_ref[rows, :].astype(F32)
        k = k_ref[rows, :].astype(F32)
        v = v_ref[rows, :].astype(F32)
        g = g_ref[rows].astype(F32) if scalar else g_ref[rows, :].astype(F32)
        r = r_ref[rows]
        states_ref[c] = state
        decay, e_from, e_to, e_through = _chunk_decays(g, r, bonus, scalar)
        o = _dot(_scores(q, k, decay, scalar), v)
        if bonus:
            o = o + jnp.sum(q * u[None, :] * k, axis=1)[:, None] * v
        o = o + _dot(q * _cols(e_from, scalar), state)
        o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
        own = _dot(k * _cols(e_to, scalar), v, trans_a=True)
        return _state_rows(e_through, scalar) * state + own

    final_ref[...] = jax.lax.fori_loop(0, chunks, body, h0_ref[...].astype(F32))


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, r_ref, u_ref, states_ref, do_ref, dfinal_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, du_ref, dh0_ref,
                *, size: int, bonus: bool, scalar: bool, scale: float):
    chunks = states_ref.shape[0]
    u = u_ref[...].astype(F32)
    i = jnp.arange(size)[:, None]
    j = jnp.arange(size)[None, :]
    t = jnp.arange(size)

    def body(n, carry):
        d_state, du = carry  # d_state: gradient of the state leaving chunk c
        c = chunks - 1 - n
        rows = pl.ds(c * size, size)
        q = q_ref[rows, :].astype(F32)
        k = k_ref[rows, :].astype(F32)
        v = v_ref[rows, :].astype(F32)
        g = g_ref[rows].astype(F32) if scalar else g_ref[rows, :].astype(F32)
        r = r_ref[rows]
        do = scale * do_ref[rows, :].astype(F32)
        state = states_ref[c]
        decay, e_from, e_to, e_through = _chunk_decays(g, r, bonus, scalar)

        # o = A v: dA = do v^T, then through A[i, j] = sum_k q_ik k_jk D_ijk.
        d_scores = _dot(do, v, trans_b=True)
        dv = _dot(_scores(q, k, decay, scalar), do, trans_a=True)
        if scalar:
            w = d_scores * decay
            dq = _dot(w, k)
            dk = _dot(w, q, trans_a=True)
            d_seg = w * _dot(q, k, trans_b=True)
        else:
            w = d_scores[:, :, None] * decay
            dq = jnp.sum(w * k[None, :, :], axis=1)
            dk = jnp.sum(w * q[:, None, :], axis=0)
            d_seg = w * q[:, None, :] * k[None, :, :]
        if bonus:  # o_i += (q_i . u . k_i) v_i
            b = jnp.sum(q * u[None, :] * k, axis=1)
            db = jnp.sum(do * v, axis=1)[:, None]
            dv = dv + b[:, None] * do
            dq = dq + db * u[None, :] * k
            dk = dk + db * u[None, :] * q
            du = du + jnp.sum(db * q * k, axis=0)
        # o += (q * Ef) S_in
        q_from = q * _cols(e_from, scalar)
        d_q_from = _dot(do, state, trans_b=True)
        dq = dq + d_q_from * _cols(e_from, scalar)
        d_from = d_q_from * q_from
        d_state_in = _dot(q_from, do, trans_a=True) + _state_rows(e_through, scalar) * d_state
        # S_out = Dt S_in + (k * Et)^T v
        through = jnp.sum(d_state * state, axis=1)
        k_to = k * _cols(e_to, scalar)
        d_k_to = _dot(v, d_state, trans_b=True)
        dk = dk + d_k_to * _cols(e_to, scalar)
        d_to = d_k_to * k_to
        dv = dv + _dot(k_to, d_state)
        if scalar:
            d_from = jnp.sum(d_from, axis=1)
            d_to = jnp.sum(d_to, axis=1)
            d_through = e_through * jnp.sum(through)
        else:
            d_through = e_through * through

        def gather(s, dg):  # dg_s: every sum of log decays that spans step s
            in_seg = (j < s) & ((s < i) if bonus else (s <= i))
            in_fs = (s < t) if bonus else (s <= t)
            row = (
                jnp.sum(jnp.sum(jnp.where(_expand(in_seg, scalar), d_seg, 0.0), axis=0), axis=0)
                + jnp.sum(jnp.where(_expand(in_fs, scalar), d_from, 0.0), axis=0)
                + jnp.sum(jnp.where(_expand(t < s, scalar), d_to, 0.0), axis=0)
                + d_through
            )
            hit = t == s
            return jnp.where(hit if scalar else hit[:, None], row, dg)

        dg = jax.lax.fori_loop(0, size, gather, jnp.zeros(g.shape, F32))
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        if scalar:
            dg_ref[rows] = dg
        else:
            dg_ref[rows, :] = dg
        return d_state_in, du

    init = (dfinal_ref[...].astype(F32), jnp.zeros(u.shape, F32))
    d_state, du = jax.lax.fori_loop(0, chunks, body, init)
    dh0_ref[...] = d_state
    du_ref[...] = du


# --------------------------------------------------------------------------------------------
# pallas_calls on the padded head-major layout


def _specs(b, h, tp, kp, vp, chunks, scalar):
    """BlockSpecs over grid (B, H) for q, k, v, g, r, u, h0 / state [Kp, Vp] and the states."""
    qk = pl.BlockSpec((None, None, tp, kp), lambda bi, hi: (bi, hi, 0, 0))
    vv = pl.BlockSpec((None, None, tp, vp), lambda bi, hi: (bi, hi, 0, 0))
    gg = (pl.BlockSpec((None, None, tp), lambda bi, hi: (bi, hi, 0)) if scalar else qk)
    rr = pl.BlockSpec((None, tp), lambda bi, hi: (bi, 0))
    uu = pl.BlockSpec((None, kp), lambda bi, hi: (hi, 0))
    st = pl.BlockSpec((None, None, kp, vp), lambda bi, hi: (bi, hi, 0, 0))
    states = pl.BlockSpec((None, None, chunks, kp, vp), lambda bi, hi: (bi, hi, 0, 0, 0))
    per_head = pl.BlockSpec((None, None, kp), lambda bi, hi: (bi, hi, 0))
    return qk, vv, gg, rr, uu, st, states, per_head


def _params() -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _forward(q, k, v, g, r, u, h0, *, size, bonus, scale, out_dtype):
    b, h, tp, kp = q.shape
    vp = v.shape[-1]
    chunks = tp // size
    scalar = g.ndim == 3
    qk, vv, gg, rr, uu, st, states, _ = _specs(b, h, tp, kp, vp, chunks, scalar)
    kernel = functools.partial(_fwd_kernel, size=size, bonus=bonus, scalar=scalar, scale=scale)
    return pl.pallas_call(
        kernel,
        grid=(b, h),
        in_specs=[qk, qk, vv, gg, rr, uu, st],
        out_specs=[vv, st, states],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, tp, vp), out_dtype),
            jax.ShapeDtypeStruct((b, h, kp, vp), F32),
            jax.ShapeDtypeStruct((b, h, chunks, kp, vp), F32),
        ],
        compiler_params=_params(),
        interpret=interpret(),
        name="tessera_gla_fwd",
    )(q, k, v, g, r, u, h0)


def _backward(q, k, v, g, r, u, states, do, dfinal, *, size, bonus, scale):
    b, h, tp, kp = q.shape
    vp = v.shape[-1]
    chunks = tp // size
    scalar = g.ndim == 3
    qk, vv, gg, rr, uu, st, sts, per_head = _specs(b, h, tp, kp, vp, chunks, scalar)
    kernel = functools.partial(_bwd_kernel, size=size, bonus=bonus, scalar=scalar, scale=scale)
    return pl.pallas_call(
        kernel,
        grid=(b, h),
        in_specs=[qk, qk, vv, gg, rr, uu, sts, vv, st],
        out_specs=[qk, qk, vv, gg, per_head, st],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, F32),
            jax.ShapeDtypeStruct(k.shape, F32),
            jax.ShapeDtypeStruct(v.shape, F32),
            jax.ShapeDtypeStruct(g.shape, F32),
            jax.ShapeDtypeStruct((b, h, kp), F32),
            jax.ShapeDtypeStruct((b, h, kp, vp), F32),
        ],
        compiler_params=_params(),
        interpret=interpret(),
        name="tessera_gla_bwd",
    )(q, k, v, g, r, u, states, do, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _gla_padded(q, k, v, g, r, u, h0, size, bonus, scale, out_dtype):
    o, final, _ = _forward(q, k, v, g, r, u, h0, size=size, bonus=bonus, scale=scale,
                           out_dtype=out_dtype)
    return o, final


def _gla_padded_fwd(q, k, v, g, r, u, h0, size, bonus, scale, out_dtype):
    o, final, states = _forward(q, k, v, g, r, u, h0, size=size, bonus=bonus, scale=scale,
                                out_dtype=out_dtype)
    return (o, final), (q, k, v, g, r, u, states)


def _gla_padded_bwd(size, bonus, scale, out_dtype, residuals, grads):
    q, k, v, g, r, u, states = residuals
    do, dfinal = grads
    dq, dk, dv, dg, du, dh0 = _backward(
        q, k, v, g, r, u, states, do.astype(F32), dfinal.astype(F32), size=size, bonus=bonus,
        scale=scale,
    )
    cast = lambda d, x: d.astype(x.dtype)  # noqa: E731
    return (cast(dq, q), cast(dk, k), cast(dv, v), dg, None, jnp.sum(du, axis=0).astype(u.dtype),
            dh0)


_gla_padded.defvjp(_gla_padded_fwd, _gla_padded_bwd)


def gla(
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
    """`tessera.kernels.gla.gla` through the Pallas GPU kernels: q, k [B, T, H, K],
    v [B, T, H, V], g [B, T, H, K] or [B, T, H] (log decay <= 0), u [H, K], h0 [B, H, K, V],
    reset [B, T] -> (o [B, T, H, V] in v.dtype, final state [B, H, K, V] float32).

    ``chunk_size`` is not read: the kernel's chunk is `chunk_length` (a power of two, what its
    dots and block shapes need). Layout, grid and algorithm in the module docstring.
    """
    del chunk_size
    check_inputs(q, k, v, g, u, h0, reset)
    qkv = ("batch", "length", "act_heads", None)
    state = ("batch", "act_heads", None, None)
    run = shard_map_kernel(
        functools.partial(_gla_shard, scale=float(scale)),
        in_axes=(qkv, qkv, qkv, qkv[: g.ndim], ("act_heads", None), state, ("batch", "length")),
        out_axes=(qkv, state),
        unsplit=unsplit_sequence(),
    )
    return run(q, k, v, g, u, h0, reset)


def unsplit_sequence() -> tuple[str, ...]:
    """The sequence axis, where the active mesh has one: the kernels need whole sequences."""
    ctx = active()
    return ("sequence",) if ctx is not None and "sequence" in ctx[0].axis_names else ()


def _gla_shard(q, k, v, g, u, h0, reset, *, scale: float):
    """One shard of `gla`: pad, move heads before time, run the kernels, cut the padding."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    kp, vp, size = padded_dim(dk), padded_dim(dv), chunk_length(g)
    tp = -(-t // size) * size
    scalar = g.ndim == 3

    def head_major(a: jax.Array, d: int | None) -> jax.Array:
        a = jnp.moveaxis(a, 2, 1)  # [B, H, T, ...]
        pad = [(0, 0), (0, 0), (0, tp - t)] + ([] if d is None else [(0, d - a.shape[-1])])
        return jnp.pad(a, pad)

    qp, kp_, vpad = head_major(q, kp), head_major(k, kp), head_major(v, vp)
    gp = head_major(g.astype(F32), None if scalar else kp)
    resets = jnp.zeros((b, t), jnp.int32) if reset is None else reset.astype(jnp.int32)
    resets = jnp.pad(resets, [(0, 0), (0, tp - t)]).reshape(b, tp // size, size)
    r = jnp.cumsum(resets, axis=2).reshape(b, tp)
    bonus = u is not None
    u_dtype = F32 if u is None else u.dtype
    up = jnp.zeros((h, kp), u_dtype) if u is None else jnp.pad(u, [(0, 0), (0, kp - dk)])
    h0p = jnp.zeros((b, h, kp, vp), F32) if h0 is None else jnp.pad(
        h0.astype(F32), [(0, 0), (0, 0), (0, kp - dk), (0, vp - dv)])
    o, final = _gla_padded(qp, kp_, vpad, gp, r, up, h0p, size, bonus, scale, v.dtype)
    o = jnp.moveaxis(o[:, :, :t, :dv], 1, 2)
    return o, final[:, :, :dk, :dv]
