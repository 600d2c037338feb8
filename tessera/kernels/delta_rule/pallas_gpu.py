"""Pallas GPU (Triton) kernels for RWKV-7's generalised delta rule (`tessera.kernels.delta_rule`),
forward and backward: the fused recurrent form (one token per step).

    u_t = S_{t-1}^T a_t                       ([V]; S_{t-1} zeroed first where reset_t)
    S_t = diag(exp(w_t)) S_{t-1} + b_t u_t^T + k_t v_t^T
    o_t = scale * S_t^T r_t

Layout: heads before time, padded: r, w, k, a, b [B, H, Tp, Kp], v [B, H, Tp, Vp], keep =
1 - reset [B, Tp] float32; Kp, Vp the head dims rounded up to a power of two >= 16 and Tp = T
rounded up to a multiple of the chunk (32). Padding is zeros (w = 0 and k = a = b = 0 on padded
tokens and channels: the state is unchanged, its padded rows stay zero).

Grid (B, H): one program per batch row and head, the state S [Kp, Vp] float32 in registers; it
walks the tokens in order (``lax.fori_loop`` over chunks and over each chunk's tokens), reading
one row of each input and writing one row of o per token. The updates are elementwise products
and row / column sums of [Kp, Vp] tiles (no dots, so no TF32 caveat). The forward saves the
state entering each chunk (float32 [B, H, Tp / 32, Kp, Vp] in HBM: one per chunk).

The backward kernel (same grid) walks the chunks in reverse carrying dS (the gradient of the
state after the chunk, from the final state's gradient): it recomputes the states entering each
of the chunk's tokens from the saved one into a per-program scratch [32, Kp, Vp] in HBM (an
output that is thrown away), then goes back over the tokens:

    dS += scale r_t do_t^T;  dr_t = scale S_t do_t;  dk_t = dS v_t;  dv_t = dS^T k_t;
    db_t = dS u_t;  du = dS^T b_t;  da_t = S'_{t-1} du;  dw_t = exp(w_t) * rowsum(dS * S'_{t-1});
    dS <- keep_t (exp(w_t) dS + a_t du^T)          (S'_{t-1} = keep_t S_{t-1})

Compared with the chunked XLA form this does O(T K V) work with no intra-chunk matmuls: a
recurrent kernel (as fla's fused_recurrent_rwkv7), exact in float32 at any decay. Runs on a GPU,
and anywhere in Pallas interpret mode (the CPU tests). Under an active mesh the kernel runs per
shard (``shard_map_kernel``: batch and heads split, the sequence gathered).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tessera.kernels.delta_rule.reference import check_inputs
from tessera.kernels.gla.pallas_gpu import padded_dim, unsplit_sequence
from tessera.kernels.platform import interpret, kernel_platform_reason
from tessera.sharding.kernels import shard_map_kernel

F32 = jnp.float32
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
CHUNK = 32  # tokens between saved states
MAX_HEAD_DIM = 256  # the state [Kp, Vp] lives in registers
NUM_WARPS = 4


def supports(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array,
             b: jax.Array, **_) -> str | None:
    """None when the kernel runs these inputs (on a GPU or in GPU interpret mode), else why not."""
    reason = kernel_platform_reason("gpu")
    if reason is not None:
        return reason
    for name, x in (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if x.dtype not in DTYPES:
            return f"{name} dtype {x.dtype} (float32 / bfloat16 / float16)"
    if r.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims {r.shape[-1]}, {v.shape[-1]} (the kernel takes up to {MAX_HEAD_DIM})"
    return None


def auto_skips(r: jax.Array, *args, **kwargs) -> str | None:
    """Auto keeps the sequential step for a single token (the decode step)."""
    return f"T = {r.shape[1]} (the decode step: the sequential form)" if r.shape[1] == 1 else None


def _load(refs, keep_ref, t):
    r_ref, w_ref, k_ref, v_ref, a_ref, b_ref = refs
    rows = tuple(ref[t, :].astype(F32) for ref in (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref))
    return (*rows, keep_ref[t])


def _step(state, w, k, v, a, b, keep):
    """(S_t, u_t, S'_{t-1}, exp(w_t)) from S_{t-1} and token t's rows."""
    prev = keep * state
    u = jnp.sum(prev * a[:, None], axis=0)
    decay = jnp.exp(w)
    new = decay[:, None] * prev + b[:, None] * u[None, :] + k[:, None] * v[None, :]
    return new, u, prev, decay


def _fwd_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, keep_ref, h0_ref, o_ref, final_ref,
                states_ref, *, scale: float):
    chunks = states_ref.shape[0]
    refs = (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref)

    def token(t, state):
        r, w, k, v, a, b, keep = _load(refs, keep_ref, t)
        state = _step(state, w, k, v, a, b, keep)[0]
        o_ref[t, :] = (scale * jnp.sum(state * r[:, None], axis=0)).astype(o_ref.dtype)
        return state

    def chunk(c, state):
        states_ref[c] = state
        return jax.lax.fori_loop(c * CHUNK, (c + 1) * CHUNK, token, state)

    final_ref[...] = jax.lax.fori_loop(0, chunks, chunk, h0_ref[...].astype(F32))


def _bwd_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, keep_ref, states_ref, do_ref,
                dfinal_ref, dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref, dh0_ref, scratch_ref,
                *, scale: float):
    chunks = states_ref.shape[0]
    refs = (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref)

    def chunk(n, d_state):
        c = chunks - 1 - n
        start = c * CHUNK

        def forward(s, state):  # the state entering each token, to the scratch
            scratch_ref[s] = state
            _, w, k, v, a, b, keep = _load(refs, keep_ref, start + s)
            return _step(state, w, k, v, a, b, keep)[0]

        jax.lax.fori_loop(0, CHUNK, forward, states_ref[c])

        def backward(m, d_state):
            s = CHUNK - 1 - m
            t = start + s
            r, w, k, v, a, b, keep = _load(refs, keep_ref, t)
            state, u, prev, decay = _step(scratch_ref[s], w, k, v, a, b, keep)
            do = scale * do_ref[t, :].astype(F32)
            d_state = d_state + r[:, None] * do[None, :]
            dr_ref[t, :] = jnp.sum(state * do[None, :], axis=1)
            dk_ref[t, :] = jnp.sum(d_state * v[None, :], axis=1)
            dv_ref[t, :] = jnp.sum(d_state * k[:, None], axis=0)
            db_ref[t, :] = jnp.sum(d_state * u[None, :], axis=1)
            du = jnp.sum(d_state * b[:, None], axis=0)
            da_ref[t, :] = jnp.sum(prev * du[None, :], axis=1)
            dw_ref[t, :] = decay * jnp.sum(d_state * prev, axis=1)
            return keep * (decay[:, None] * d_state + a[:, None] * du[None, :])

        return jax.lax.fori_loop(0, CHUNK, backward, d_state)

    dh0_ref[...] = jax.lax.fori_loop(0, chunks, chunk, dfinal_ref[...].astype(F32))


def _specs(tp, kp, vp, chunks):
    kk = pl.BlockSpec((None, None, tp, kp), lambda bi, hi: (bi, hi, 0, 0))
    vv = pl.BlockSpec((None, None, tp, vp), lambda bi, hi: (bi, hi, 0, 0))
    keep = pl.BlockSpec((None, tp), lambda bi, hi: (bi, 0))
    state = pl.BlockSpec((None, None, kp, vp), lambda bi, hi: (bi, hi, 0, 0))
    states = pl.BlockSpec((None, None, chunks, kp, vp), lambda bi, hi: (bi, hi, 0, 0, 0))
    scratch = pl.BlockSpec((None, None, CHUNK, kp, vp), lambda bi, hi: (bi, hi, 0, 0, 0))
    return kk, vv, keep, state, states, scratch


def _params() -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _forward(r, w, k, v, a, b, keep, h0, *, scale, out_dtype):
    bsz, h, tp, kp = r.shape
    vp = v.shape[-1]
    chunks = tp // CHUNK
    kk, vv, keep_s, state, states, _ = _specs(tp, kp, vp, chunks)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale),
        grid=(bsz, h),
        in_specs=[kk, kk, kk, vv, kk, kk, keep_s, state],
        out_specs=[vv, state, states],
        out_shape=[
            jax.ShapeDtypeStruct((bsz, h, tp, vp), out_dtype),
            jax.ShapeDtypeStruct((bsz, h, kp, vp), F32),
            jax.ShapeDtypeStruct((bsz, h, chunks, kp, vp), F32),
        ],
        compiler_params=_params(),
        interpret=interpret(),
        name="tessera_delta_rule_fwd",
    )(r, w, k, v, a, b, keep, h0)


def _backward(r, w, k, v, a, b, keep, states, do, dfinal, *, scale):
    bsz, h, tp, kp = r.shape
    vp = v.shape[-1]
    chunks = tp // CHUNK
    kk, vv, keep_s, state, states_s, scratch = _specs(tp, kp, vp, chunks)
    grad = jax.ShapeDtypeStruct((bsz, h, tp, kp), F32)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, scale=scale),
        grid=(bsz, h),
        in_specs=[kk, kk, kk, vv, kk, kk, keep_s, states_s, vv, state],
        out_specs=[kk, kk, kk, vv, kk, kk, state, scratch],
        out_shape=[
            grad, grad, grad,
            jax.ShapeDtypeStruct((bsz, h, tp, vp), F32),
            grad, grad,
            jax.ShapeDtypeStruct((bsz, h, kp, vp), F32),
            jax.ShapeDtypeStruct((bsz, h, CHUNK, kp, vp), F32),
        ],
        compiler_params=_params(),
        interpret=interpret(),
        name="tessera_delta_rule_bwd",
    )(r, w, k, v, a, b, keep, states, do, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _delta_padded(r, w, k, v, a, b, keep, h0, scale, out_dtype):
    o, final, _ = _forward(r, w, k, v, a, b, keep, h0, scale=scale, out_dtype=out_dtype)
    return o, final


def _delta_padded_fwd(r, w, k, v, a, b, keep, h0, scale, out_dtype):
    o, final, states = _forward(r, w, k, v, a, b, keep, h0, scale=scale, out_dtype=out_dtype)
    return (o, final), (r, w, k, v, a, b, keep, states)


def _delta_padded_bwd(scale, out_dtype, residuals, grads):
    r, w, k, v, a, b, keep, states = residuals
    do, dfinal = grads
    *dx, dh0, _ = _backward(r, w, k, v, a, b, keep, states, do.astype(F32), dfinal.astype(F32),
                            scale=scale)
    dr, dw, dk, dv, da, db = (d.astype(x.dtype) for d, x in zip(dx, (r, w, k, v, a, b)))
    return dr, dw, dk, dv, da, db, None, dh0


_delta_padded.defvjp(_delta_padded_fwd, _delta_padded_bwd)


def delta_rule(
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
    """`tessera.kernels.delta_rule.delta_rule` through the Pallas GPU kernels: r, w, k, a, b
    [B, T, H, K], v [B, T, H, V], h0 [B, H, K, V], reset [B, T] -> (o [B, T, H, V] in v.dtype,
    final state [B, H, K, V] float32). ``chunk_size`` is not read (the kernel saves a state
    every `CHUNK` tokens). Layout, grid and algorithm in the module docstring."""
    del chunk_size
    check_inputs(r, w, k, v, a, b, h0, reset)
    rows = ("batch", "length", "act_heads", None)
    state = ("batch", "act_heads", None, None)
    run = shard_map_kernel(
        functools.partial(_delta_shard, scale=float(scale)),
        in_axes=(rows,) * 6 + (state, ("batch", "length")),
        out_axes=(rows, state),
        unsplit=unsplit_sequence(),
    )
    return run(r, w, k, v, a, b, h0, reset)


def _delta_shard(r, w, k, v, a, b, h0, reset, *, scale: float):
    """One shard of `delta_rule`: pad, move heads before time, run the kernels, cut padding."""
    bsz, t, h, dk = r.shape
    dv = v.shape[-1]
    kp, vp = padded_dim(dk), padded_dim(dv)
    tp = -(-t // CHUNK) * CHUNK

    def head_major(x: jax.Array, d: int) -> jax.Array:
        x = jnp.moveaxis(x, 2, 1)  # [B, H, T, D]
        return jnp.pad(x, [(0, 0), (0, 0), (0, tp - t), (0, d - x.shape[-1])])

    keep = jnp.ones((bsz, t), F32) if reset is None else 1.0 - reset.astype(F32)
    keep = jnp.pad(keep, [(0, 0), (0, tp - t)], constant_values=1.0)
    h0p = jnp.zeros((bsz, h, kp, vp), F32) if h0 is None else jnp.pad(
        h0.astype(F32), [(0, 0), (0, 0), (0, kp - dk), (0, vp - dv)])
    o, final = _delta_padded(
        *(head_major(x, kp) for x in (r, w, k)), head_major(v, vp),
        *(head_major(x, kp) for x in (a, b)), keep, h0p, scale, v.dtype,
    )
    return jnp.moveaxis(o[:, :, :t, :dv], 1, 2), final[:, :, :dk, :dv]
