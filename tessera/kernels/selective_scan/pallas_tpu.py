"""Mamba-1's selective scan on TPU (Pallas Mosaic), forward and backward.

    h_t = a_t * h_{t-1} + u_t B_t,   a_t = keep_t exp(dt_t A),   u_t = dt_t x_t
    y_t = C_t . h_t + D x_t

Per batch row the state h is [Di, N]; the kernel holds it transposed, ``[N, bd]`` float32 (the
N = 16 state entries on sublanes, a block of ``bd`` channels on lanes), so that every per-token
step is elementwise on whole vregs: ``exp(dt_row A)`` with dt_row [1, bd] broadcast down the
sublanes, ``u_row * B_col`` with B_t as a column [N, 1] broadcast along the lanes, and the
readout ``C . h`` a sum over the N sublanes.

Layout (one shard's arrays; the wrapper pads T to a multiple of the chunk L and Di to one of bd):
  x, dt, y [B, Tp, Dp] (their dtype)   blocks [L, bd]
  A^T [N, Dp] f32, D [1, Dp] f32       blocks [N, bd], [1, bd]
  W [B, K, R, LW] f32                  block [R, LW]: rows B_t (N), C_t (N), keep_t (1), zeros
                                       (R = 2N + 1 rounded up to 8); tokens on lanes (LW: L
                                       rounded up to 128)
  h0, final state [B, N, Dp] f32       blocks [N, bd]
  starts [B, K, N, Dp] f32             the state entering each chunk (saved for the backward)

Grid (B "parallel", Dp / bd "parallel", K = Tp / L "arbitrary"); the state lives in VMEM scratch
across the chunk axis. A chunk first casts its x / dt block to float32 scratch (u = dt x, dt),
then a ``fori_loop`` over its L tokens (unrolled by 16) runs the recurrence, with
exp(dt A) = exp2(dt (A log2 e)). Token t's column of W (B_t, C_t, keep_t) is taken with a lane
mask and a lane sum of the [R, LW] block (no dynamic lane slicing); x / dt rows are dynamic
sublane reads of the float32 scratch; y rows go to a float32 scratch that is cast and stored,
with ``D x`` added, once per chunk. Padding tokens have dt = 0, x = 0, keep = 1 (a = 1, no
input: the state is unchanged); padded channels have A = 0, x = dt = 0, D = 0 and h0 = 0 (their
state stays 0 and their outputs are dropped).

Backward (the custom VJP). With g_t = dL/dh_t (all paths through h_t),

    g_t = C_t dy_t + a_{t+1} g_{t+1},   g_{T-1} = C_{T-1} dy_{T-1} + dh_T     (dh_T: the final
                                                                               state's cotangent)
and for each token, from h_t = a_t h_{t-1} + u_t B_t, y_t = C_t . h_t + D x_t:

    du_t[d]  = sum_n g_t[d, n] B_t[n]          dx_t  = du_t dt_t + D dy_t
    dz_t     = g_t h_{t-1} a_t                 (z = dt A, a = keep exp(z): da/dz = a)
    ddt_t[d] = du_t[d] x_t[d] + sum_n dz_t[d, n] A[d, n]
    dA      += dz_t dt_t[d]                    (summed over batch and time)
    dB_t[n]  = sum_d g_t[d, n] u_t[d]          dC_t[n] = sum_d dy_t[d] h_t[d, n]
    dD      += dy_t x_t                        dh0 = a_0 g_0

The backward grid is the forward's with the chunks in reverse; the adjoint g [N, bd] lives in
VMEM scratch across chunks. Each chunk first recomputes its states from its saved start (one
forward pass over the chunk), keeping per token the decay a_t and the carried-over state
a_t h_{t-1} in VMEM scratch [L, N, bd] each (dz_t = g_t (a_t h_{t-1}); no second exp), and
taking dC_t on the way (h_t is at hand there); then it runs the adjoint recurrence over its
tokens in reverse. dB and dC are sums over channels: each channel block writes its own partial
[B, Dp / bd, K, N, LW] (tokens on lanes, accumulated per chunk as a masked [N, LW] update), and
the wrapper adds the blocks; dA and dD are per-batch-row partials [B, N, Dp], [B, 1, Dp]
written at the last chunk and summed over the batch in the wrapper (outside shard_map, where
XLA reduces across devices).

HBM kept for the backward besides the inputs: one state per chunk, ``N * Dp * 4 / L`` bytes per
token and row (2 KiB at N = 16, Di = 4096, L = 128: a quarter of x's bf16 row). VMEM per
program: the forward's f32 scratch is 3 L bd + N bd floats plus the double-buffered blocks
(about 2 MiB at L = 128, bd = 512); the backward's adds the two [L, N, bd] f32 scratches
(8 MiB) to five [L, bd] ones, about 12 MiB in all (BWD_VMEM_LIMIT raises the scoped limit).

Static cost on v5p (LLO bundles of the compiled loops, per token and 512-channel block): the
forward's token loop 31 bundles (+ 4 per token of chunk overhead), the backward's recompute 29
and reverse 51 (+ 8): about 123 cycles per token and 512 channels for forward + backward, the
VALU slots close to full (per element: exp2 on the EUP, about 5 VALU ops forward, 12 backward).

The kernel runs per shard under ``shard_map_kernel``: batch on ``batch``, channels on
``act_ssm_inner`` (the Mamba mixer's activation name); T is never split (the scan needs it
whole; an input split over ``sequence`` is gathered).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tessera.kernels.platform import interpret, kernel_platform_reason, target_device
from tessera.sharding.kernels import shard_map_kernel

LANES = 128
UNROLL = 16  # tokens per fori_loop iteration (v5p bundles per token: 8: 33, 16: 31, 4: 41)
LOG2E = 1.4426950408889634
# The backward's two [L, N, bd] f32 scratches (a_t h_{t-1}, a_t) take 2 L N bd 4 bytes (8 MiB at
# L = 128, N = 16, bd = 512), capped at BWD_SCRATCH (a large N narrows bd, then L); with the
# blocks that is over v5e's 16 MiB default scoped VMEM, so the backward asks for 32 MiB.
BWD_VMEM_LIMIT = 32 * 2**20
BWD_SCRATCH = 8 * 2**20
# Channel block bd (lanes) and chunk L (tokens) by device kind (jax.Device.device_kind). On v5p
# (static LLO bundles per token and 512 channels, forward + backward) bd = 512, L = 128: 123;
# bd = 256: 146; L = 256: 130; bd = 1024 does not fit the backward's VMEM.
BLOCKS = {"default": (512, 128)}
F32 = jnp.float32


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def supports(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
             D: jax.Array, **kw) -> str | None:
    """None when the kernel can run these inputs, else why not (static facts only)."""
    reason = kernel_platform_reason("tpu")
    if reason is not None:
        return reason
    for name, a in (("x", x), ("dt", dt)):
        if a.dtype not in (jnp.float32, jnp.bfloat16):
            return f"{name} is {a.dtype}, not float32 or bfloat16"
    return None


def _blocks(t: int, di: int, n: int,
            block: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """(bd, Dp, L, Tp) for a shard with T tokens, Di channels and N states; ``block`` (bd, L)
    overrides the table. A large N narrows bd, then shortens L, to keep the backward's two
    [L, N, bd] float32 scratches within BWD_SCRATCH bytes."""
    bd, chunk = block or BLOCKS.get(target_device().device_kind, BLOCKS["default"])
    if block is None:
        bd = min(bd, max(LANES, BWD_SCRATCH // (8 * chunk * n) // LANES * LANES))
        chunk = min(chunk, max(16, BWD_SCRATCH // (8 * bd * n) // 16 * 16))
    dp = _round_up(di, LANES)
    bd = min(bd, dp)
    while dp % bd:
        bd -= LANES
    length = min(chunk, _round_up(t, 16))
    return bd, dp, length, _round_up(t, length)


def _token_loop(w: jax.Array, n: int, length: int, body, carry, reverse: bool = False):
    """``carry = body(t, (B_t, C_t, keep_t), carry)`` for the chunk's tokens t = 0 .. L - 1 (or
    in reverse), B_t, C_t [N, 1] and keep_t [1, 1] the columns of the W block [R, LW].

    A ``fori_loop`` over the tokens, unrolled by UNROLL. Token t's column is picked with a lane
    mask and a lane sum of W (no dynamic lane indexing). (A variant rotating W once per 8
    tokens with ``pltpu.roll`` and slicing static lanes compiled to more bundles per token on
    v5p: the lane broadcasts went through the XLU.)"""
    lane = jax.lax.broadcasted_iota(jnp.int32, w.shape, 1)

    def step(i, carry):
        t = length - 1 - i if reverse else i
        col = jnp.sum(jnp.where(lane == t, w, 0.0), axis=1, keepdims=True)
        return body(t, (col[:n], col[n:2 * n], col[2 * n:2 * n + 1]), carry)

    return jax.lax.fori_loop(0, length, step, carry, unroll=UNROLL)


def _fwd_kernel(x_ref, dt_ref, a_ref, w_ref, d_ref, h0_ref, y_ref, ht_ref, *rest, n: int,
                save: bool):
    if save:
        starts_ref, h_sc, u_sc, dt_sc, y_sc = rest
    else:
        h_sc, u_sc, dt_sc, y_sc = rest
    k = pl.program_id(2)
    length = x_ref.shape[0]

    @pl.when(k == 0)
    def _init():
        h_sc[...] = h0_ref[...]

    if save:
        starts_ref[...] = h_sc[...]
    x = x_ref[...].astype(F32)
    dt = dt_ref[...].astype(F32)
    dt_sc[...] = dt
    u_sc[...] = dt * x
    a2 = a_ref[...] * LOG2E  # exp(dt A) = exp2(dt A log2 e): one multiply less per element

    def step(t, cols, h):
        b_t, c_t, keep_t = cols
        dt_row = dt_sc[pl.ds(t, 1), :]
        h = jnp.exp2(dt_row * a2) * keep_t * h + u_sc[pl.ds(t, 1), :] * b_t
        y_sc[pl.ds(t, 1), :] = jnp.sum(c_t * h, axis=0, keepdims=True)
        return h

    h = _token_loop(w_ref[...], n, length, step, h_sc[...])
    h_sc[...] = h
    y_ref[...] = (y_sc[...] + d_ref[...] * x).astype(y_ref.dtype)

    @pl.when(k == pl.num_programs(2) - 1)
    def _final():
        ht_ref[...] = h


def _bwd_kernel(x_ref, dt_ref, a_ref, w_ref, d_ref, start_ref, dy_ref, dht_ref,
                dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dd_ref, dh0_ref,
                g_sc, da_sc, dd_sc, hd_sc, dec_sc, u_sc, dt_sc, dy_sc, du_sc, dza_sc, *,
                n: int):
    k = pl.program_id(2)  # the chunk is K - 1 - k: chunks in reverse
    length = x_ref.shape[0]

    @pl.when(k == 0)
    def _init():
        g_sc[...] = dht_ref[...]
        da_sc[...] = jnp.zeros(da_sc.shape, F32)
        dd_sc[...] = jnp.zeros(dd_sc.shape, F32)

    x = x_ref[...].astype(F32)
    dt = dt_ref[...].astype(F32)
    dy = dy_ref[...].astype(F32)
    dt_sc[...] = dt
    u_sc[...] = dt * x
    dy_sc[...] = dy
    a = a_ref[...]
    a2 = a * LOG2E
    w = w_ref[...]
    lane_n = jax.lax.broadcasted_iota(jnp.int32, (n, w.shape[1]), 1)

    # Recompute the chunk: keep each token's decay a_t and carried-over state a_t h_{t-1}
    # (what the adjoint needs), and take dC_t = sum_d dy_t h_t on the way (h_t is at hand).
    def forward(t, cols, carry):
        h, dc = carry
        b_t, _, keep_t = cols
        decay = jnp.exp2(dt_sc[pl.ds(t, 1), :] * a2) * keep_t
        dec_sc[t] = decay
        kept = decay * h
        hd_sc[t] = kept
        h = kept + u_sc[pl.ds(t, 1), :] * b_t
        dc_t = jnp.sum(h * dy_sc[pl.ds(t, 1), :], axis=1, keepdims=True)
        return h, dc + jnp.where(lane_n == t, dc_t, 0.0)

    zeros_nl = jnp.zeros(lane_n.shape, F32)
    _, dc = _token_loop(w, n, length, forward, (start_ref[...], zeros_nl))

    def backward(t, cols, carry):
        g, da, db = carry
        b_t, c_t, _ = cols
        dt_row = dt_sc[pl.ds(t, 1), :]
        u_row = u_sc[pl.ds(t, 1), :]
        g = g + c_t * dy_sc[pl.ds(t, 1), :]  # g_t
        du = jnp.sum(g * b_t, axis=0, keepdims=True)
        dz = g * hd_sc[t]
        du_sc[pl.ds(t, 1), :] = du  # dx = du dt + D dy, ddt = du x + dza: after the loop
        dza_sc[pl.ds(t, 1), :] = jnp.sum(dz * a, axis=0, keepdims=True)
        da = da + dz * dt_row
        db = db + jnp.where(lane_n == t, jnp.sum(g * u_row, axis=1, keepdims=True), 0.0)
        return dec_sc[t] * g, da, db

    g, da, db = _token_loop(
        w, n, length, backward, (g_sc[...], jnp.zeros(a.shape, F32), zeros_nl), reverse=True)
    g_sc[...] = g
    da_sc[...] += da
    dd_sc[...] += jnp.sum(dy * x, axis=0, keepdims=True)
    du = du_sc[...]
    dx_ref[...] = (du * dt + d_ref[...] * dy).astype(dx_ref.dtype)
    ddt_ref[...] = (du * x + dza_sc[...]).astype(ddt_ref.dtype)
    db_ref[...] = db
    dc_ref[...] = dc

    @pl.when(k == pl.num_programs(2) - 1)
    def _final():
        dh0_ref[...] = g
        da_ref[...] = da_sc[...]
        dd_ref[...] = dd_sc[...]


def _cost(b: int, tp: int, dp: int, n: int, r: int, nj: int, length: int, x_bytes: int,
          dt_bytes: int, backward: bool) -> pl.CostEstimate:
    """The work the kernels do, counted from their code. Per (token, channel, state) element:
    the forward 7 flops and one exp (exp(dt A), keep, a h, u B, +, C h, the N-sum); the backward
    recomputes the forward (6 + exp) and runs the adjoint (19 + exp: g += C dy, the decay, du,
    dz, dz A, dA, dB, dC, a g). Per token and channel a few more (u, D x, dx, ddt, dD). Per token
    and channel block: picking W's column (a masked lane sum, 2 R L) and, backward, the masked
    dB / dC accumulation (4 N L). Bytes: every block the grid fetches or writes once."""
    elems = b * tp * dp * n
    tokens = b * tp * dp
    pick = 2 * r * length * b * tp * nj
    w_bytes = nj * b * tp * r * 4
    state = b * n * dp * 4  # one [N, Dp] f32 per row: A, h0, final state, dA, dh0, ...
    starts = (tp // length) * state
    if not backward:
        flops = 7 * elems + 3 * tokens + pick
        bytes_ = tokens * (2 * x_bytes + dt_bytes) + w_bytes + 3 * state + starts
        return pl.CostEstimate(flops=flops, transcendentals=elems, bytes_accessed=bytes_)
    flops = 25 * elems + 8 * tokens + 2 * pick + 4 * n * length * b * tp * nj
    bytes_ = (tokens * (3 * x_bytes + 2 * dt_bytes) + w_bytes + 2 * nj * b * tp * n * 4
              + 5 * state + starts)
    return pl.CostEstimate(flops=flops, transcendentals=2 * elems, bytes_accessed=bytes_)


def _prepare(x, dt, A, B, C, D, keep, block):
    """Pad one shard's inputs to the kernel's layout: (x, dt [B, Tp, Dp], A^T [N, Dp],
    W [B, K, R, L], D [1, Dp], (bd, L))."""
    b, t, di = x.shape
    n = A.shape[1]
    bd, dp, length, tp = _blocks(t, di, A.shape[1], block)
    r = _round_up(2 * n + 1, 8)
    pad3 = ((0, 0), (0, tp - t), (0, dp - di))
    xp = jnp.pad(x, pad3)
    dtp = jnp.pad(dt, pad3)
    at = jnp.pad(A.astype(F32).T, ((0, 0), (0, dp - di)))
    w = jnp.concatenate(
        [B.astype(F32), C.astype(F32), keep.astype(F32)[..., None],
         jnp.zeros((b, t, r - 2 * n - 1), F32)], axis=-1)
    # Padded tokens: keep = 1 (with dt = 0: the state is unchanged); B = C = 0.
    w = jnp.pad(w, ((0, 0), (0, tp - t), (0, 0)))
    w = w.at[:, t:, 2 * n].set(1.0)
    w = w.reshape(b, tp // length, length, r).transpose(0, 1, 3, 2)  # [B, K, R, L]
    w = jnp.pad(w, ((0, 0), (0, 0), (0, 0), (0, _round_up(length, LANES) - length)))
    dpad = jnp.pad(D.astype(F32), (0, dp - di))[None, :]
    return xp, dtp, at, w, dpad, (bd, length)


def _forward(x, dt, A, B, C, D, h0, keep, *, save: bool, block: tuple[int, int] | None):
    """One shard: x, dt [B, T, Di]; A [Di, N]; B, C [B, T, N]; D [Di]; h0 [B, Di, N] f32;
    keep [B, T] f32 -> y [B, T, Di], final state [B, Di, N], and with ``save`` the chunk
    starts [B, K, N, Dp]."""
    b, t, di = x.shape
    n = A.shape[1]
    xp, dtp, at, w, dpad, (bd, length) = _prepare(x, dt, A, B, C, D, keep, block)
    tp, dp = xp.shape[1:]
    r = w.shape[2]
    nj, nk = dp // bd, tp // length
    h0t = jnp.pad(h0.astype(F32).transpose(0, 2, 1), ((0, 0), (0, 0), (0, dp - di)))
    sq = pl.squeezed
    tok = pl.BlockSpec((sq, length, bd), lambda bi, j, k: (bi, k, j))
    chan = pl.BlockSpec((n, bd), lambda bi, j, k: (0, j))
    state = pl.BlockSpec((sq, n, bd), lambda bi, j, k: (bi, 0, j))
    out_shape = [jax.ShapeDtypeStruct(xp.shape, x.dtype), jax.ShapeDtypeStruct((b, n, dp), F32)]
    out_specs = [tok, state]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((b, nk, n, dp), F32))
        out_specs.append(pl.BlockSpec((sq, sq, n, bd), lambda bi, j, k: (bi, k, 0, j)))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, save=save),
        grid=(b, nj, nk),
        in_specs=[
            tok, tok, chan,
            pl.BlockSpec((sq, sq, r, w.shape[3]), lambda bi, j, k: (bi, k, 0, 0)),
            pl.BlockSpec((1, bd), lambda bi, j, k: (0, j)),
            state,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((n, bd), F32)] + [pltpu.VMEM((length, bd), F32)] * 3,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(b, tp, dp, n, r, nj, length, x.dtype.itemsize, dt.dtype.itemsize,
                            backward=False),
        interpret=interpret(),
        name="tessera_selective_scan_fwd",
    )(xp, dtp, at, w, dpad, h0t)
    y = outs[0][:, :t, :di]
    ht = outs[1][:, :, :di].transpose(0, 2, 1)
    return (y, ht, outs[2]) if save else (y, ht)


def _backward(x, dt, A, B, C, D, keep, starts, dy, dht, *, block: tuple[int, int] | None):
    """One shard: the forward's inputs, its chunk starts, the cotangents dy [B, T, Di] and
    dht [B, Di, N] -> dx, ddt [B, T, Di]; per-row partials dA [B, Di, N], dD [B, Di]; dB, dC
    [B, T, N] summed over this shard's channels; dh0 [B, Di, N]."""
    b, t, di = x.shape
    n = A.shape[1]
    xp, dtp, at, w, dpad, (bd, length) = _prepare(x, dt, A, B, C, D, keep, block)
    tp, dp = xp.shape[1:]
    r = w.shape[2]
    nj, nk = dp // bd, tp // length
    pad3 = ((0, 0), (0, tp - t), (0, dp - di))
    dyp = jnp.pad(dy, pad3)
    dhtt = jnp.pad(dht.astype(F32).transpose(0, 2, 1), ((0, 0), (0, 0), (0, dp - di)))
    sq = pl.squeezed
    last = nk - 1
    tok = pl.BlockSpec((sq, length, bd), lambda bi, j, k: (bi, last - k, j))
    chan = pl.BlockSpec((n, bd), lambda bi, j, k: (0, j))
    state = pl.BlockSpec((sq, n, bd), lambda bi, j, k: (bi, 0, j))
    lw = w.shape[3]
    part = pl.BlockSpec((sq, sq, sq, n, lw), lambda bi, j, k: (bi, j, last - k, 0, 0))
    row = pl.BlockSpec((sq, 1, bd), lambda bi, j, k: (bi, 0, j))
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, n=n),
        grid=(b, nj, nk),
        in_specs=[
            tok, tok, chan,
            pl.BlockSpec((sq, sq, r, lw), lambda bi, j, k: (bi, last - k, 0, 0)),
            pl.BlockSpec((1, bd), lambda bi, j, k: (0, j)),
            pl.BlockSpec((sq, sq, n, bd), lambda bi, j, k: (bi, last - k, 0, j)),
            tok, state,
        ],
        out_specs=[tok, tok, part, part, state, row, state],
        out_shape=[
            jax.ShapeDtypeStruct(xp.shape, x.dtype),
            jax.ShapeDtypeStruct(xp.shape, dt.dtype),
            jax.ShapeDtypeStruct((b, nj, nk, n, lw), F32),
            jax.ShapeDtypeStruct((b, nj, nk, n, lw), F32),
            jax.ShapeDtypeStruct((b, n, dp), F32),
            jax.ShapeDtypeStruct((b, 1, dp), F32),
            jax.ShapeDtypeStruct((b, n, dp), F32),
        ],
        scratch_shapes=[
            pltpu.VMEM((n, bd), F32), pltpu.VMEM((n, bd), F32), pltpu.VMEM((1, bd), F32),
            pltpu.VMEM((length, n, bd), F32), pltpu.VMEM((length, n, bd), F32),
            *[pltpu.VMEM((length, bd), F32)] * 5,
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=BWD_VMEM_LIMIT),
        cost_estimate=_cost(b, tp, dp, n, r, nj, length, x.dtype.itemsize, dt.dtype.itemsize,
                            backward=True),
        interpret=interpret(),
        name="tessera_selective_scan_bwd",
    )(xp, dtp, at, w, dpad, starts, dyp, dhtt)
    dx, ddt, db, dc, da, dd, dh0 = outs
    dx = dx[:, :t, :di]
    ddt = ddt[:, :t, :di]
    db = db[..., :length].sum(axis=1).transpose(0, 1, 3, 2).reshape(b, tp, n)[:, :t]
    dc = dc[..., :length].sum(axis=1).transpose(0, 1, 3, 2).reshape(b, tp, n)[:, :t]
    da = da[:, :, :di].transpose(0, 2, 1)
    dd = dd[:, 0, :di]
    dh0 = dh0[:, :, :di].transpose(0, 2, 1)
    return dx, ddt, da, db[:, None], dc[:, None], dd, dh0


# Logical axes: batch rows on "batch", channels on the Mamba mixer's "act_ssm_inner".
_TOKENS = ("batch", None, "act_ssm_inner")
_STATE = ("batch", "act_ssm_inner", None)
_IN_AXES = (_TOKENS, _TOKENS, ("act_ssm_inner", None), ("batch", None, None),
            ("batch", None, None), ("act_ssm_inner",))


def _scan_nograd(block, x, dt, A, B, C, D, h0, keep):
    run = shard_map_kernel(
        functools.partial(_forward, save=False, block=block),
        in_axes=(*_IN_AXES, _STATE, ("batch", None)),
        out_axes=(_TOKENS, _STATE),
    )
    return run(x, dt, A, B, C, D, h0, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(block, x, dt, A, B, C, D, h0, keep):
    """The sharded kernel (no chunk states saved when not differentiated)."""
    return _scan_nograd(block, x, dt, A, B, C, D, h0, keep)


def _scan_fwd(block, x, dt, A, B, C, D, h0, keep):
    run = shard_map_kernel(
        functools.partial(_forward, save=True, block=block),
        in_axes=(*_IN_AXES, _STATE, ("batch", None)),
        out_axes=(_TOKENS, _STATE, ("batch", None, None, "act_ssm_inner")),
    )
    y, ht, starts = run(x, dt, A, B, C, D, h0, keep)
    return (y, ht), (x, dt, A, B, C, D, keep, starts)


def _scan_bwd(block, res, cotangents):
    x, dt, A, B, C, D, keep, starts = res
    dy, dht = cotangents
    run = shard_map_kernel(
        functools.partial(_backward, block=block),
        in_axes=(*_IN_AXES, ("batch", None), ("batch", None, None, "act_ssm_inner"),
                 _TOKENS, _STATE),
        out_axes=(_TOKENS, _TOKENS, _STATE, ("batch", "act_ssm_inner", None, None),
                  ("batch", "act_ssm_inner", None, None), ("batch", "act_ssm_inner"), _STATE),
    )
    dx, ddt, da, db, dc, dd, dh0 = run(x, dt, A, B, C, D, keep, starts, dy.astype(x.dtype), dht)
    # Sums over batch rows (dA, dD) and over the channel shards (dB, dC): XLA reduces across
    # devices here.
    return (dx, ddt, da.sum(0).astype(A.dtype), db.sum(1).astype(B.dtype),
            dc.sum(1).astype(C.dtype), dd.sum(0).astype(D.dtype), dh0.astype(F32),
            jnp.zeros_like(keep))


_scan.defvjp(_scan_fwd, _scan_bwd)


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
    block: tuple[int, int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The kernel: x, dt [B, T, Di] (float32 or bfloat16); A [Di, N]; B, C [B, T, N]; D [Di];
    h0 [B, Di, N] (default zeros); reset bool [B, T] -> (y [B, T, Di] in x's dtype, final
    state [B, Di, N] float32). Differentiable wrt every float input. ``block`` = (bd, L)
    overrides the per-generation table (bd a multiple of 128, L of 16; tests use small L)."""
    from tessera.kernels.selective_scan import _check_shapes  # the op's check (a cycle)

    _check_shapes(x, dt, A, B, C, D, h0, reset)
    b, t, di = x.shape
    n = A.shape[1]
    h0 = jnp.zeros((b, di, n), F32) if h0 is None else h0.astype(F32)
    keep = jnp.ones((b, t), F32) if reset is None else 1.0 - reset.astype(F32)
    return _scan(block, x, dt, A, B, C, D, h0, keep)
