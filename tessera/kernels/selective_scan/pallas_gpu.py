"""Pallas GPU (Triton) kernels for Mamba-1's selective scan (`tessera.kernels.selective_scan`),
forward and backward.

    h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t      (h [Di, N] per batch row)
    y_t = C_t . h_t + D x_t

Layout: x, dt [B, Tp, Dp] and keep = 1 - reset [B, Tp] float32 as given (time-major rows),
B, C [B, Tp, Np], A [Dp, Np], h0 [B, Dp, Np]; Np = N rounded up to a power of two, Dp = Di
rounded up to a multiple of the channel block (a power of two, <= 64), Tp = T rounded up to a
multiple of the chunk (32). Padding is zeros (dt = 0 and keep = 1 on padded steps: the state is
unchanged; padded channels have x = dt = 0). The skip D x is added outside by XLA.

Grid (B, Dp / block): one program per batch row and block of channels; the state h [block, Np]
float32 lives in registers. The program walks the time steps in order (``lax.fori_loop`` over
chunks, and over the chunk's steps inside), one row of x, dt, B, C, keep read per step and one
row of y written, exactly the reference's arithmetic (the decay exp(dt A) * keep, no dots: the
recurrence is elementwise in (channel, state)). The forward saves the state entering each chunk
(float32 [B, Dp / block, Tp / 32, block, Np] in HBM: one per chunk, not per step).

The backward kernel (same grid) walks the chunks in reverse carrying dh (the gradient of the
state leaving the chunk, from the final state's gradient): it recomputes the chunk's states from
the saved one, writes the state entering each step to a per-program scratch [32, block, Np] in
HBM (an output that is thrown away), then runs the adjoint recurrence backwards over the chunk's
steps: dh += dy_t C_t; dC_t = sum_d dy_t h_t; dB_t = sum_d (dt x)_t dh; d(dt x)_t =
sum_n dh B_t; dz = dh h_{t-1} decay_t (z = dt A); dA += dz dt_t; ddt_t = sum_n dz A + d(dt x) x;
dh <- decay_t dh. dB, dC are per channel block and dA per batch row; XLA sums them.

All math is float32 (inputs cast after the load). Runs on a GPU, and anywhere in Pallas
interpret mode (the CPU tests). No dots, so no TF32 caveat: auto may pick it for float32.
Under an active mesh the kernel runs per shard (``shard_map_kernel``: batch and channels
(``act_ssm_inner``) split, the sequence gathered).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tessera.kernels.gla.pallas_gpu import unsplit_sequence
from tessera.kernels.platform import interpret, kernel_platform_reason
from tessera.sharding.kernels import shard_map_kernel

F32 = jnp.float32
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
CHUNK = 32  # steps between saved states
MAX_BLOCK = 64  # channels per program
MAX_STATE = 256  # N (the state [block, Np] lives in registers)
NUM_WARPS = 4


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def channel_block(di: int) -> int:
    """Channels per program: Di rounded up to a power of two, at most MAX_BLOCK."""
    return min(MAX_BLOCK, _pow2(di))


def supports(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
             D: jax.Array, **_) -> str | None:
    """None when the kernel runs these inputs (on a GPU or in GPU interpret mode), else why not."""
    reason = kernel_platform_reason("gpu")
    if reason is not None:
        return reason
    for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if a.dtype not in DTYPES:
            return f"{name} dtype {a.dtype} (float32 / bfloat16 / float16)"
    if A.shape[-1] > MAX_STATE:
        return f"state dim {A.shape[-1]} (the kernel takes up to {MAX_STATE})"
    return None


def auto_skips(x: jax.Array, *args, **kwargs) -> str | None:
    """Auto keeps the XLA forms for a single token (T = 1: nothing to scan)."""
    return f"T = {x.shape[1]} (a single step)" if x.shape[1] == 1 else None


def _fwd_kernel(x_ref, dt_ref, keep_ref, b_ref, c_ref, a_ref, h0_ref, y_ref, final_ref,
                states_ref):
    chunks = states_ref.shape[0]
    a = a_ref[...].astype(F32)

    def step(t, h):
        x = x_ref[t, :].astype(F32)
        dt = dt_ref[t, :].astype(F32)
        decay = jnp.exp(dt[:, None] * a) * keep_ref[t]
        h = decay * h + (dt * x)[:, None] * b_ref[t, :].astype(F32)[None, :]
        y_ref[t, :] = jnp.sum(h * c_ref[t, :].astype(F32)[None, :], axis=1)
        return h

    def chunk(c, h):
        states_ref[c] = h
        return jax.lax.fori_loop(c * CHUNK, (c + 1) * CHUNK, step, h)

    final_ref[...] = jax.lax.fori_loop(0, chunks, chunk, h0_ref[...].astype(F32))


def _bwd_kernel(x_ref, dt_ref, keep_ref, b_ref, c_ref, a_ref, states_ref, dy_ref, dfinal_ref,
                dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dh0_ref, scratch_ref):
    chunks = states_ref.shape[0]
    a = a_ref[...].astype(F32)

    def load(t):
        x = x_ref[t, :].astype(F32)
        dt = dt_ref[t, :].astype(F32)
        decay = jnp.exp(dt[:, None] * a) * keep_ref[t]
        return x, dt, decay, b_ref[t, :].astype(F32)

    def chunk(n, carry):
        c = chunks - 1 - n
        start = c * CHUNK

        def forward(s, h):  # the state entering each step, to the scratch
            scratch_ref[s] = h
            x, dt, decay, b = load(start + s)
            return decay * h + (dt * x)[:, None] * b[None, :]

        jax.lax.fori_loop(0, CHUNK, forward, states_ref[c])

        def backward(m, carry):
            dh, da = carry
            s = CHUNK - 1 - m
            t = start + s
            x, dt, decay, b = load(t)
            c_t = c_ref[t, :].astype(F32)
            dy = dy_ref[t, :].astype(F32)
            h_prev = scratch_ref[s]
            h = decay * h_prev + (dt * x)[:, None] * b[None, :]
            dh = dh + dy[:, None] * c_t[None, :]
            dc_ref[t, :] = jnp.sum(dy[:, None] * h, axis=0)
            db_ref[t, :] = jnp.sum(dh * (dt * x)[:, None], axis=0)
            d_dtx = jnp.sum(dh * b[None, :], axis=1)
            dz = dh * h_prev * decay
            dx_ref[t, :] = d_dtx * dt
            ddt_ref[t, :] = jnp.sum(dz * a, axis=1) + d_dtx * x
            return decay * dh, da + dz * dt[:, None]

        return jax.lax.fori_loop(0, CHUNK, backward, carry)

    init = (dfinal_ref[...].astype(F32), jnp.zeros(a.shape, F32))
    dh, da = jax.lax.fori_loop(0, chunks, chunk, init)
    dh0_ref[...] = dh
    da_ref[...] = da


def _specs(tp, block, np_, chunks):
    rows = pl.BlockSpec((None, tp, block), lambda bi, j: (bi, 0, j))
    keep = pl.BlockSpec((None, tp), lambda bi, j: (bi, 0))
    bc = pl.BlockSpec((None, tp, np_), lambda bi, j: (bi, 0, 0))
    a = pl.BlockSpec((block, np_), lambda bi, j: (j, 0))
    state = pl.BlockSpec((None, block, np_), lambda bi, j: (bi, j, 0))
    states = pl.BlockSpec((None, None, chunks, block, np_), lambda bi, j: (bi, j, 0, 0, 0))
    per_block = pl.BlockSpec((None, None, tp, np_), lambda bi, j: (bi, j, 0, 0))
    scratch = pl.BlockSpec((None, None, CHUNK, block, np_), lambda bi, j: (bi, j, 0, 0, 0))
    return rows, keep, bc, a, state, states, per_block, scratch


def _params() -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _forward(x, dt, keep, B, C, A, h0, block):
    b, tp, dp = x.shape
    np_ = B.shape[-1]
    blocks, chunks = dp // block, tp // CHUNK
    rows, keep_s, bc, a, state, states, _, _ = _specs(tp, block, np_, chunks)
    return pl.pallas_call(
        _fwd_kernel,
        grid=(b, blocks),
        in_specs=[rows, rows, keep_s, bc, bc, a, state],
        out_specs=[rows, state, states],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, dp), F32),
            jax.ShapeDtypeStruct((b, dp, np_), F32),
            jax.ShapeDtypeStruct((b, blocks, chunks, block, np_), F32),
        ],
        compiler_params=_params(),
        interpret=interpret(),
        name="tessera_selective_scan_fwd",
    )(x, dt, keep, B, C, A, h0)


def _backward(x, dt, keep, B, C, A, states, dy, dfinal, block):
    b, tp, dp = x.shape
    np_ = B.shape[-1]
    blocks, chunks = dp // block, tp // CHUNK
    rows, keep_s, bc, a, state, states_s, per_block, scratch = _specs(tp, block, np_, chunks)
    return pl.pallas_call(
        _bwd_kernel,
        grid=(b, blocks),
        in_specs=[rows, rows, keep_s, bc, bc, a, states_s, rows, state],
        out_specs=[rows, rows, per_block, per_block, state, state, scratch],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, dp), F32),
            jax.ShapeDtypeStruct((b, tp, dp), F32),
            jax.ShapeDtypeStruct((b, blocks, tp, np_), F32),
            jax.ShapeDtypeStruct((b, blocks, tp, np_), F32),
            jax.ShapeDtypeStruct((b, dp, np_), F32),
            jax.ShapeDtypeStruct((b, dp, np_), F32),
            jax.ShapeDtypeStruct((b, blocks, CHUNK, block, np_), F32),
        ],
        compiler_params=_params(),
        interpret=interpret(),
        name="tessera_selective_scan_bwd",
    )(x, dt, keep, B, C, A, states, dy, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _scan_padded(x, dt, keep, B, C, A, h0, block):
    y, final, _ = _forward(x, dt, keep, B, C, A, h0, block)
    return y, final


def _scan_padded_fwd(x, dt, keep, B, C, A, h0, block):
    y, final, states = _forward(x, dt, keep, B, C, A, h0, block)
    return (y, final), (x, dt, keep, B, C, A, states)


def _scan_padded_bwd(block, residuals, grads):
    x, dt, keep, B, C, A, states = residuals
    dy, dfinal = grads
    dx, ddt, dB, dC, dA, dh0, _ = _backward(
        x, dt, keep, B, C, A, states, dy.astype(F32), dfinal.astype(F32), block
    )
    return (dx.astype(x.dtype), ddt.astype(dt.dtype), None, jnp.sum(dB, axis=1).astype(B.dtype),
            jnp.sum(dC, axis=1).astype(C.dtype), jnp.sum(dA, axis=0).astype(A.dtype), dh0)


_scan_padded.defvjp(_scan_padded_fwd, _scan_padded_bwd)


def selective_scan(
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
    """`tessera.kernels.selective_scan.selective_scan` through the Pallas GPU kernels: x, dt
    [B, T, Di], A [Di, N], B, C [B, T, N], D [Di], h0 [B, Di, N], reset [B, T] -> (y [B, T, Di]
    in x's dtype, final state [B, Di, N] float32). ``chunk_size`` is not read (the kernel saves
    a state every `CHUNK` steps). Layout, grid and algorithm in the module docstring."""
    del chunk_size
    rows, state = ("batch", "length", "act_ssm_inner"), ("batch", "act_ssm_inner", None)
    run = shard_map_kernel(
        _scan_shard,
        in_axes=(rows, rows, ("act_ssm_inner", None), ("batch", "length", None),
                 ("batch", "length", None), ("act_ssm_inner",), state, ("batch", "length")),
        out_axes=(rows, state),
        unsplit=unsplit_sequence(),
    )
    return run(x, dt, A, B, C, D, h0, reset)


def _scan_shard(x, dt, A, B, C, D, h0, reset):
    """One shard of `selective_scan`: pad, run the kernels, cut the padding, add D x."""
    b, t, di = x.shape
    n = A.shape[1]
    block = channel_block(di)
    dp, np_, tp = -(-di // block) * block, _pow2(n), -(-t // CHUNK) * CHUNK

    def pad(a: jax.Array, *widths: int) -> jax.Array:
        return jnp.pad(a, [(0, w - s) for w, s in zip(widths, a.shape)])

    keep = jnp.ones((b, t), F32) if reset is None else 1.0 - reset.astype(F32)
    keep = jnp.pad(keep, [(0, 0), (0, tp - t)], constant_values=1.0)
    h0p = jnp.zeros((b, dp, np_), F32) if h0 is None else pad(h0.astype(F32), b, dp, np_)
    y, final = _scan_padded(
        pad(x, b, tp, dp), pad(dt, b, tp, dp), keep, pad(B, b, tp, np_), pad(C, b, tp, np_),
        pad(A, dp, np_), h0p, block,
    )
    y = y[:, :t, :di] + D.astype(F32) * x.astype(F32)
    return y.astype(x.dtype), final[:, :di, :n]
