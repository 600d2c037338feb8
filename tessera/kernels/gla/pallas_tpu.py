"""The chunked gated linear recurrence (`reference.chunked`) as Pallas TPU (Mosaic) kernels,
forward and backward (``jax.custom_vjp``).

Layout. The kernels read the tokens where they lie: q, k [B, T', H*K] and v, o [B, T', H*V]
(free reshapes of gla's [B, T, H, D]; no head-major relayout, no HBM copy), T' = T padded to a
multiple of the chunk L with k = v = 0, g = 0 (such tokens keep the state). A block is
[L, hb*K]: the fewest heads hb whose features fill whole 128-lane tiles (2 heads of 64, 1 of
128 or more; all H when none do), looped over inside the kernel. The grid is (B, H / hb, T' / L):
batch and head blocks "parallel", the chunks "arbitrary" (sequential), the states S [hb, K, V]
float32 in VMEM scratch from one chunk to the next. q and k may also be one head shared by all
(SSD with one group, `tessera.kernels.ssd.pallas_tpu`): [B, T', K], read by every head block,
their gradients summed over the block's heads in the kernel and over blocks by XLA. The wrapper
also turns g into the chunk-local prefix sums of the log decays (float32):

    Pk_i = sum_{s <= i} g_s                 (inclusive, within the chunk)
    Pq_i = Pk_i without u, Pk_{i-1} with u  (exclusive: the bonus query reads the state before
                                             its token)

(per channel [B, T', H*K] like q; scalar g as one row [1, L] per head and chunk,
[B, H, T'/L, 1, L]) and the reset counts
r_i = #resets at chunk positions <= i (a row [1, L]). jax differentiates these jnp steps (dg from
dPq, dPk by reverse cumulative sums), so the kernels see only q, k, v, Pq, Pk, r, u, h0.

Forward, per chunk with incoming state S (o written scaled, all decay math float32):

    Fq_i = exp(Pq_i)        where r_i = 0 (no reset up to i), else 0          [L, K or 1]
    Fk_j = exp(P_L - Pk_j)  where r_j = r_L (no reset after j), else 0
    th   = exp(P_L)         where r_L = 0, else 0                             [1, K or 1]
    D_ijc = exp(Pq_ic - Pk_jc) on j <= i (j < i with u) and r_i = r_j, else 0
    A_ij = sum_c q_ic k_jc D_ijc     (scalar g: A = (q k^T) * D, an MXU matmul)
    o    = scale * (A v + (q * Fq) S + beta * v),   beta_i = sum_c q_ic u_c k_ic (u only)
    S'   = diag(th) S + (k * Fk)^T v

Every exponent is <= 0 (a sum of log decays; masked to -inf before the exp, clamped at 0 against
rounding), so per-step log decays of -20 stay finite. Exponents are differences of chunk-local
prefix sums: their absolute error is a few ulp(|P|) with |P| <= L * max|g| (3e-5 for L = 16 at
-20 per step), a relative error of that size in each decay factor.

Per-channel g computes A on the VPU, one key column j at a time (L steps over [L, K] tiles):
exp(Pq - Pk_j) masked, times q * k_j, summed over channels (L * K exps per token); hence the
small default chunk (16) for per-channel g and 128 for scalar g (`CHUNKS`).

Backward, chunks in reverse, dS (the cotangent of the state leaving the chunk) in VMEM scratch,
the chunk's incoming state S read from the forward's saved states [B, H, T'/L, K, V] float32
(K * V * 4 / L bytes per token and head: 1 KiB for RWKV-6's K = V = 64 at L = 16, 4 KiB for
RetNet's K = 256, V = 512 at L = 128, 256 B for Mamba-2's N = 128, P = 64). With
dO = scale * do:

    dv   = A^T dO + (k * Fk) dS + beta * dO
    dS_in = (q * Fq)^T dO + diag(th) dS         (the next dS; dh0 at the first chunk)
    dA   = dO v^T
    dq'  = sum_j dA_ij k_j D_ij  + (dO S^T) * Fq          (scalar: (dA * D) k + ...)
    dk'  = sum_i dA_ij q_i D_ij  + (v dS^T) * Fk          (scalar: (dA * D)^T q + ...)
    dq   = dq' + dbeta * u * k,  dk = dk' + dbeta * u * q,  du = sum_i dbeta_i q_i k_i,
           dbeta_i = sum_v dO_iv v_iv
    dPq  = q * dq'      dPk = -k * dk' + [i = L] (sum_j k_j (v dS^T)_j Fk_j + th * diag(S dS^T))

(dPq and dPk follow because every decay factor is exp(Pq_i - ...) or exp(... - Pk_j): the
derivative of a term wrt its exponent is the term itself; summed over K for scalar g.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tessera.kernels.gla.reference import check_inputs
from tessera.kernels.platform import (
    LANES,
    full_f32_matmuls,
    heads_filling_lanes,
    interpret,
    kernel_platform_reason,
    target_device,
)
from tessera.sharding.kernels import shard_map_kernel

F32 = jnp.float32
SUBLANES = 8
# Chunk lengths by device kind (jax.Device.device_kind) and decay kind; "default" for others.
CHUNKS = {"default": {"scalar": 128, "channel": 16}}

NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b^T
TN = (((0,), (0,)), ((), ()))  # a^T @ b


def supports(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, **kw) -> str | None:
    """None when the kernel can run these inputs, else why not (static facts only)."""
    return kernel_platform_reason("tpu")


def chunk_length(g: jax.Array, chunk: int | None) -> int:
    """The chunk L: ``chunk`` if given, else the per-generation default for g's kind."""
    if chunk is not None:
        return chunk
    table = CHUNKS.get(target_device().device_kind, CHUNKS["default"])
    return table["scalar" if g.ndim == 3 else "channel"]


def matmul_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The MXU operand dtype for inputs of ``dtype``: the input dtype, except that float32 runs
    one bfloat16 pass unless ``jax_default_matmul_precision`` asks for full float32
    (`full_f32_matmuls`), as XLA's float32 dots do on TPU, so the kernel computes what the
    chunked XLA form beside it computes (tests run at "highest": exact)."""
    return jnp.bfloat16 if dtype == F32 and not full_f32_matmuls() else dtype


def _mm(a, b, dims, cdt):
    """An MXU product of a and b in the operand dtype ``cdt`` with float32 accumulation
    (float32 operands at HIGHEST precision: 6 passes)."""
    precision = jax.lax.Precision.HIGHEST if cdt == F32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a.astype(cdt), b.astype(cdt), dims, precision=precision,
                               preferred_element_type=F32)


def _to_col(row):
    """[1, n] -> [n, 1] on the VPU (no transpose)."""
    n = row.shape[1]
    eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(
        jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _to_row(col):
    """[n, 1] -> [1, n] on the VPU."""
    n = col.shape[0]
    eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(
        jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _exp_le0(x, keep):
    """exp(min(x, 0)) where ``keep``, else 0 (masked to -inf before the exp)."""
    return jnp.exp(jnp.where(keep, jnp.minimum(x, 0.0), -jnp.inf))


class _Chunk:
    """One head's chunk: operands and decay factors, shared by the forward and backward kernels.
    q, k [L, K], v [L, V] (input dtypes), pq, pk [L, K] per channel or rows [1, L] for scalar
    g, rrow [1, L], u [1, K] or None."""

    def __init__(self, q, k, v, pq, pk, rrow, u, channel, bonus):
        self.cdt = matmul_dtype(q.dtype)
        self.q, self.k, self.v = q.astype(F32), k.astype(F32), v.astype(F32)
        n = self.q.shape[0]
        self.n, self.channel, self.bonus = n, channel, bonus
        self.rrow = rrow  # [1, L]
        self.rcol = _to_col(rrow)  # [L, 1]
        r_last = rrow[:, n - 1:]  # [1, 1]
        if channel:
            self.pq, self.pk = pq, pk  # [L, K]
            self.pl = pk[n - 1:, :]  # [1, K]
        else:
            self.pk_row = pk  # [1, L]
            self.pq, self.pk = _to_col(pq), _to_col(pk)  # [L, 1]
            self.pl = pk[:, n - 1:]  # [1, 1]
        self.fq = _exp_le0(self.pq, self.rcol == 0)  # [L, K or 1]
        self.fk = _exp_le0(self.pl - self.pk, self.rcol == r_last)
        self.th = _exp_le0(self.pl, r_last == 0)  # [1, K or 1]
        self.qt = self.q * self.fq
        self.kt = self.k * self.fk
        self.rows = jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0)
        self.lanes = jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)
        self.u = u.astype(F32) if bonus else None  # [1, K]
        self.beta = (jnp.sum(self.q * self.u * self.k, axis=1, keepdims=True) if bonus
                     else None)  # [L, 1]

    def _below(self, j):
        """Column mask [L, 1]: query rows i that key j reaches (j <= i, or j < i with u, with no
        reset in between)."""
        reach = self.rows > j if self.bonus else self.rows >= j
        return reach & (self.rcol == self.rrow[:, j:j + 1])

    def decay(self):
        """Scalar g: D [L, L]."""
        n = self.n
        rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
        reach = rows > cols if self.bonus else rows >= cols
        return _exp_le0(self.pq - self.pk_row, reach & (self.rcol == self.rrow))

    def scores(self):
        """A [L, L] (float32)."""
        if not self.channel:
            return _mm(self.q, self.k, NT, self.cdt) * self.decay()
        a = jnp.zeros((self.n, self.n), F32)
        for j in range(self.n):
            e = _exp_le0(self.pq - self.pk[j:j + 1], self._below(j))  # [L, K]
            col = jnp.sum(self.q * self.k[j:j + 1] * e, axis=1, keepdims=True)
            a = a + jnp.where(self.lanes == j, col, 0.0)
        return a

    def intra_grads(self, da):
        """(sum_j dA_ij k_j D_ij, sum_i dA_ij q_i D_ij), each [L, K], and A."""
        if not self.channel:
            d = self.decay()
            a = _mm(self.q, self.k, NT, self.cdt) * d
            gd = da * d
            return _mm(gd, self.k, NN, self.cdt), _mm(gd, self.q, TN, self.cdt), a
        a = jnp.zeros((self.n, self.n), F32)
        dq = jnp.zeros_like(self.q)
        dk = jnp.zeros_like(self.k)
        for j in range(self.n):
            e = _exp_le0(self.pq - self.pk[j:j + 1], self._below(j))  # [L, K]
            qe = self.q * e
            col = jnp.sum(qe * self.k[j:j + 1], axis=1, keepdims=True)
            a = a + jnp.where(self.lanes == j, col, 0.0)
            da_j = da[:, j:j + 1]  # [L, 1]
            dq = dq + da_j * self.k[j:j + 1] * e
            dk = dk + jnp.where(self.rows == j, jnp.sum(da_j * qe, axis=0, keepdims=True), 0.0)
        return dq, dk, a


def _head(refs, hd, dk, dv, channel, bonus, shared):
    """Head ``hd`` of the block: a `_Chunk` from refs (q, k, v, Pq, Pk, r, u); with ``shared``
    the q and k blocks are [L, K], one head for all."""
    q_ref, k_ref, v_ref, pq_ref, pk_ref, r_ref, u_ref = refs
    ks, vs = slice(hd * dk, (hd + 1) * dk), slice(hd * dv, (hd + 1) * dv)
    pq = pq_ref[:, ks] if channel else pq_ref[hd]
    pk = pk_ref[:, ks] if channel else pk_ref[hd]
    qk = slice(None) if shared else ks
    return _Chunk(q_ref[:, qk], k_ref[:, qk], v_ref[:, vs], pq, pk, r_ref[...],
                  u_ref[hd] if bonus else None, channel, bonus)


def _fwd_kernel(*refs, channel: bool, bonus: bool, scale: float, save: bool, dk: int, dv: int,
                shared: bool):
    """refs: q, k [L, hb*K], v [L, hb*V], Pq, Pk ([L, hb*K] or [hb, 1, L]), r [1, L],
    (u [hb, 1, K]), h0 [hb, K, V]; out: o [L, hb*V], (when ``save``) the incoming states
    [hb, K, V], the final states [hb, K, V]; scratch S [hb, K, V]. A loop over the hb heads."""
    ins = list(refs[:6]) + [refs[6] if bonus else None]
    h0_ref, o_ref = refs[6 + bonus:8 + bonus]
    states_ref = refs[8 + bonus] if save else None
    final_ref, s_sc = refs[8 + bonus + save:]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        s_sc[...] = h0_ref[...]

    for hd in range(s_sc.shape[0]):
        s = s_sc[hd]
        if save:
            states_ref[hd] = s
        ch = _head(ins, hd, dk, dv, channel, bonus, shared)
        o = _mm(ch.scores(), ch.v, NN, ch.cdt) + _mm(ch.qt, s, NN, ch.cdt)
        if bonus:
            o = o + ch.beta * ch.v
        o_ref[:, hd * dv:(hd + 1) * dv] = (scale * o).astype(o_ref.dtype)
        th = _to_col(ch.th) if channel else ch.th  # [K, 1] or [1, 1]
        s_sc[hd] = th * s + _mm(ch.kt, ch.v, TN, ch.cdt)

    @pl.when(c == pl.num_programs(2) - 1)
    def _final():
        final_ref[...] = s_sc[...]


def _bwd_kernel(*refs, channel: bool, bonus: bool, scale: float, dk: int, dv: int,
                shared: bool):
    """refs: q, k, v, Pq, Pk, r, (u) as in the forward, the chunk's incoming states [hb, K, V],
    do [L, hb*V], the final states' cotangent [hb, K, V]; out: dq, dk [L, hb*K] ([L, K] summed
    over the hb heads with ``shared``), dv [L, hb*V], dPq, dPk (as Pq), (du [hb, 1, K]), dh0
    [hb, K, V]; scratch dS [hb, K, V]. Chunks arrive last first."""
    ins = list(refs[:6]) + [refs[6] if bonus else None]
    rest = refs[6 + bonus:]
    s_ref, do_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dpq_ref, dpk_ref = rest[:8]
    du_ref = rest[8] if bonus else None
    dh0_ref, ds_sc = rest[8 + bonus:]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        ds_sc[...] = dfinal_ref[...]

    sum_q = sum_k = 0.0
    for hd in range(ds_sc.shape[0]):
        ks, vs = slice(hd * dk, (hd + 1) * dk), slice(hd * dv, (hd + 1) * dv)
        ds = ds_sc[hd]
        s = s_ref[hd]
        ch = _head(ins, hd, dk, dv, channel, bonus, shared)
        cdt = ch.cdt
        do = scale * do_ref[:, vs].astype(F32)  # [L, V]
        da = _mm(do, ch.v, NT, cdt)  # [L, L]
        dq_in, dk_in, a = ch.intra_grads(da)
        dq_x = _mm(do, s, NT, cdt) * ch.fq  # [L, K]: through the incoming state
        dk_x = _mm(ch.v, ds, NT, cdt) * ch.fk  # through the outgoing state
        gq, gk = dq_in + dq_x, dk_in + dk_x
        dv_ = _mm(a, do, TN, cdt) + _mm(ch.kt, ds, NN, cdt)
        last = ch.rows == ch.n - 1  # [L, 1]
        if channel:
            dpq_ref[:, ks] = ch.q * gq
            dth = _to_row(jnp.sum(s * ds, axis=1, keepdims=True))  # [1, K]
            dpl = jnp.sum(ch.k * dk_x, axis=0, keepdims=True) + dth * ch.th
            dpk_ref[:, ks] = -ch.k * gk + jnp.where(last, dpl, 0.0)
            th = _to_col(ch.th)
        else:
            dpq_ref[hd] = _to_row(jnp.sum(ch.q * gq, axis=1, keepdims=True))
            dpl = jnp.sum(ch.k * dk_x) + jnp.sum(s * ds) * ch.th  # [1, 1]
            dpk_col = -jnp.sum(ch.k * gk, axis=1, keepdims=True) + jnp.where(last, dpl, 0.0)
            dpk_ref[hd] = _to_row(dpk_col)
            th = ch.th
        if bonus:
            dbeta = jnp.sum(do * ch.v, axis=1, keepdims=True)  # [L, 1]
            gq = gq + dbeta * ch.u * ch.k
            gk = gk + dbeta * ch.u * ch.q
            dv_ = dv_ + ch.beta * do
            du_ref[hd] = jnp.sum(dbeta * ch.q * ch.k, axis=0, keepdims=True)
        if shared:
            sum_q, sum_k = sum_q + gq, sum_k + gk
        else:
            dq_ref[:, ks] = gq.astype(dq_ref.dtype)
            dk_ref[:, ks] = gk.astype(dk_ref.dtype)
        dv_ref[:, vs] = dv_.astype(dv_ref.dtype)
        ds_sc[hd] = _mm(ch.qt, do, TN, cdt) + th * ds
    if shared:
        dq_ref[...] = sum_q.astype(dq_ref.dtype)
        dk_ref[...] = sum_k.astype(dk_ref.dtype)

    @pl.when(c == pl.num_programs(2) - 1)
    def _first_chunk():
        dh0_ref[...] = ds_sc[...]


def _costs(b, h, nc, n, dk, dv, channel, bonus, itemsize, backward):
    """A pl.CostEstimate counted from the kernel's work per chunk and head: matmuls (float32
    operands at HIGHEST precision count 6 MXU passes, see `matmul_dtype`), the per-channel
    [L, L, K] VPU work, exps, and the HBM blocks read and written."""
    chunks = b * h * nc
    passes = 6 if itemsize == 4 and full_f32_matmuls() else 1
    mm = 2 * n * n * dk + 2 * n * n * dv + 2 * n * dk * dv * 2  # q k^T, A v, q S, k^T v
    vpu = n * n * dk * 6 if channel else n * n * 4
    exps = n * n * dk + 2 * n * dk if channel else n * n + 2 * n
    p_bytes = (2 * n * dk if channel else 2 * n) * 4
    io = (2 * n * dk + 2 * n * dv) * itemsize + p_bytes + n * 4 + dk * dv * 4  # + o, state
    if backward:  # + dA, dq/dk through the states, dv's two terms, dS; recomputed A
        mm = mm * 2 + 2 * n * dk * dv * 2
        vpu, exps = vpu * 2, exps
        io = io + (2 * n * dk + 2 * n * dv) * itemsize + p_bytes
    return pl.CostEstimate(flops=chunks * (mm * passes + vpu), transcendentals=chunks * exps,
                           bytes_accessed=chunks * io)


def _specs(n, nc, h, dk, dv, channel, bonus, reverse, shared):
    """BlockSpecs over the grid (b, head block j, chunk c) of q, k, v, Pq, Pk, r, (u), the
    chunk states [B, H, nc, K, V] and per-head states [B, H, K, V]; chunk c read last first when
    ``reverse``. With ``shared`` q and k are [B, T', K] (one head for all) and their gradients
    [B, T', H/hb * K] (summed over each head block)."""
    sq = pl.squeezed
    hb = heads_filling_lanes(h, (dk, dv))  # a block is [L, hb * K] of q [B, T, H * K]

    def at(c):
        return nc - 1 - c if reverse else c

    def tok(width):
        return pl.BlockSpec((sq, n, hb * width), lambda b, j, c: (b, at(c), j))

    p = tok(dk) if channel else pl.BlockSpec((sq, hb, sq, 1, n),
                                             lambda b, j, c: (b, j, at(c), 0, 0))
    qk = pl.BlockSpec((sq, n, dk), lambda b, j, c: (b, at(c), 0)) if shared else tok(dk)
    dqk = pl.BlockSpec((sq, n, dk), lambda b, j, c: (b, at(c), j)) if shared else tok(dk)
    ins = [qk, qk, tok(dv), p, p,
           pl.BlockSpec((sq, sq, 1, n), lambda b, j, c: (b, at(c), 0, 0))]
    if bonus:
        ins.append(pl.BlockSpec((hb, 1, dk), lambda b, j, c: (j, 0, 0)))
    chunk_state = pl.BlockSpec((sq, hb, sq, dk, dv), lambda b, j, c: (b, j, at(c), 0, 0))
    state = pl.BlockSpec((sq, hb, dk, dv), lambda b, j, c: (b, j, 0, 0))
    du = pl.BlockSpec((sq, hb, sq, 1, dk), lambda b, j, c: (b, j, at(c), 0, 0))
    return dict(ins=ins, dqk=dqk, tok_v=tok(dv), p=p, chunk_state=chunk_state,
                state=state, du=du, hb=hb)


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _dims(q, r, h0):
    b, tp, _ = q.shape
    _, h, dk, dv = h0.shape
    n = r.shape[-1]
    return b, tp, h, dk, dv, n, tp // n, h > 1 and q.shape[-1] == dk


def _forward(q, k, v, pq, pk, r, u, h0, *, scale, save):
    """The forward pallas_call on q, k [B, T', H*K], v [B, T', H*V], Pq, Pk ([B, T', H*K] or
    [B, H, T'/L, 1, L]), r [B, T'/L, 1, L], u [H, 1, K] or None, h0 [B, H, K, V] -> (o
    [B, T', H*V], the incoming states [B, H, T'/L, K, V] float32 when ``save`` else None, the
    final states)."""
    b, tp, h, dk, dv, n, nc, shared = _dims(q, r, h0)
    channel, bonus = pq.ndim == 3, u is not None
    sp = _specs(n, nc, h, dk, dv, channel, bonus, reverse=False, shared=shared)
    out_specs, out_shape = [sp["tok_v"]], [jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if save:
        out_specs.append(sp["chunk_state"])
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, dk, dv), F32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, channel=channel, bonus=bonus, scale=scale, save=save,
                          dk=dk, dv=dv, shared=shared),
        grid=(b, h // sp["hb"], nc),
        in_specs=sp["ins"] + [sp["state"]],
        out_specs=out_specs + [sp["state"]],
        out_shape=out_shape + [jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((sp["hb"], dk, dv), F32)],
        compiler_params=_params(),
        cost_estimate=_costs(b, h, nc, n, dk, dv, channel, bonus, q.dtype.itemsize, False),
        interpret=interpret(),
        name="tessera_gla_fwd",
    )(q, k, v, pq, pk, r, *([u] if bonus else []), h0)
    return outs[0], (outs[1] if save else None), outs[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(scale, q, k, v, pq, pk, r, u, h0):
    o, _, final = _forward(q, k, v, pq, pk, r, u, h0, scale=scale, save=False)
    return o, final


def _core_fwd(scale, q, k, v, pq, pk, r, u, h0):
    o, states, final = _forward(q, k, v, pq, pk, r, u, h0, scale=scale, save=True)
    return (o, final), (q, k, v, pq, pk, r, u, h0, states)


def _core_bwd(scale, res, cts):
    q, k, v, pq, pk, r, u, h0, states = res
    do, dfinal = cts
    b, tp, h, dk, dv, n, nc, shared = _dims(q, r, h0)
    channel, bonus = pq.ndim == 3, u is not None
    sp = _specs(n, nc, h, dk, dv, channel, bonus, reverse=True, shared=shared)
    blocks = h // sp["hb"]
    out_specs = [sp["dqk"], sp["dqk"], sp["tok_v"], sp["p"], sp["p"]]
    out_shape = [jax.ShapeDtypeStruct((b, tp, blocks * dk) if shared else a.shape, a.dtype)
                 for a in (q, k)]
    out_shape += [jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_shape += [jax.ShapeDtypeStruct(a.shape, F32) for a in (pq, pk)]
    if bonus:
        out_specs.append(sp["du"])
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, 1, dk), F32))
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, channel=channel, bonus=bonus, scale=scale, dk=dk, dv=dv,
                          shared=shared),
        grid=(b, h // sp["hb"], nc),
        in_specs=sp["ins"] + [sp["chunk_state"], sp["tok_v"], sp["state"]],
        out_specs=out_specs + [sp["state"]],
        out_shape=out_shape + [jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((sp["hb"], dk, dv), F32)],
        compiler_params=_params(),
        cost_estimate=_costs(b, h, nc, n, dk, dv, channel, bonus, q.dtype.itemsize, True),
        interpret=interpret(),
        name="tessera_gla_bwd",
    )(q, k, v, pq, pk, r, *([u] if bonus else []), states, do, dfinal)
    dq, dk_, dv_, dpq, dpk = outs[:5]
    if shared:  # sum the head blocks' partial gradients
        dq, dk_ = (d.reshape(b, tp, blocks, dk).astype(F32).sum(2).astype(q.dtype)
                   for d in (dq, dk_))
    du = jnp.sum(outs[5], axis=(0, 2)).astype(u.dtype) if bonus else None
    return dq, dk_, dv_, dpq, dpk, jnp.zeros_like(r), du, outs[-1].astype(h0.dtype)


_core.defvjp(_core_fwd, _core_bwd)


def _per_shard(q, k, v, g, u, h0, reset, *, scale, n):
    """One device's rows and heads, in gla's layout -> (o [B, T, H, V], final [B, H, K, V]).
    q and k may have one head for all H (SSD with one group): the kernels read it once per head
    block, and it is repeated here only where the block layout cannot take its gradients."""
    b, t, _, dk = q.shape
    h, dv = v.shape[2], v.shape[3]
    if q.shape[2] != h and not (dk % LANES == 0 or heads_filling_lanes(h, (dk, dv)) == h):
        q, k = (jnp.broadcast_to(a, (b, t, h, dk)) for a in (q, k))
    nc = -(-t // n)
    tp = nc * n
    channel = g.ndim == 4

    def pad(a):  # zero tokens up to T'
        return jnp.pad(a, [(0, 0), (0, tp - t)] + [(0, 0)] * (a.ndim - 2))

    def flat(a):  # [B, T, H, D] -> [B, T', H * D]: no data movement
        return pad(a).reshape(b, tp, -1)

    # Chunk-local prefix sums of the log decays (float32): per channel in the token layout
    # [B, T', H*K]; scalar as one row per head and chunk [B, H, T'/L, 1, L] (4 bytes a token).
    gc = pad(g.astype(F32)).reshape(b, nc, n, h, -1)
    pk = jnp.cumsum(gc, axis=2)
    pq = pk if u is None else jnp.pad(pk[:, :, :-1], [(0, 0), (0, 0), (1, 0), (0, 0), (0, 0)])
    if channel:
        pq, pk = (p.reshape(b, tp, h * dk) for p in (pq, pk))
    else:
        pq, pk = (jnp.transpose(p[..., 0], (0, 3, 1, 2))[:, :, :, None, :] for p in (pq, pk))
    reset = jnp.zeros((b, t), bool) if reset is None else reset
    r = jnp.cumsum(pad(reset).astype(jnp.int32).reshape(b, nc, n), axis=2).astype(F32)
    h0 = jnp.zeros((b, h, dk, dv), F32) if h0 is None else h0.astype(F32)
    u = None if u is None else u[:, None, :]
    o, final = _core(scale, flat(q), flat(k), flat(v), pq, pk, r[:, :, None, :], u, h0)
    return o.reshape(b, tp, h, dv)[:, :t], final


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
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`tessera.kernels.gla.gla` on the Pallas TPU kernels (shapes there), run per device under
    ``shard_map`` over batch (``batch``) and heads (``act_heads``). The kernel's chunk L is
    ``chunk`` (a multiple of 8), by default `CHUNKS` for the device kind (128 tokens for
    scalar g, 16 per channel). ``chunk_size`` (the op's, tuned for the chunked XLA form) is
    ignored."""
    del chunk_size
    check_inputs(q, k, v, g, u, h0, reset)
    n = chunk_length(g, chunk)
    if n < 1 or n % SUBLANES:
        raise ValueError(f"gla pallas_tpu: chunk must be a multiple of {SUBLANES}, got {n}")
    tok = ("batch", None, "act_heads", None)
    run = shard_map_kernel(
        functools.partial(_per_shard, scale=float(scale), n=n),
        in_axes=(tok, tok, tok, tok if g.ndim == 4 else tok[:3], ("act_heads", None),
                 ("batch", "act_heads", None, None), ("batch", None)),
        out_axes=(tok, ("batch", "act_heads", None, None)),
    )
    return run(q, k, v, g, u, h0, reset)
