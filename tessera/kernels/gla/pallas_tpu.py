"""The chunked gated linear recurrence (`reference.chunked`) as Pallas TPU (Mosaic) kernels,
forward and backward (``jax.custom_vjp``).

Layout. The wrapper moves heads before time: q, k [B, H, T', K], v [B, H, T', V] (one HBM pass
over q, k, v and o, and over the gradients in the backward; the kernel then reads lane-dense
[L, K] / [L, V] blocks of one head), T' = T padded to a multiple of the chunk L with k = v = 0,
g = 0 (such tokens keep the state). The grid is (B, H, T' / L): batch and heads "parallel", the
chunks "arbitrary" (sequential), the state S [K, V] float32 in VMEM scratch from one chunk to the
next. The wrapper also turns g into the chunk-local prefix sums of the log decays (float32):

    Pk_i = sum_{s <= i} g_s                 (inclusive, within the chunk)
    Pq_i = Pk_i without u, Pk_{i-1} with u  (exclusive: the bonus query reads the state before
                                             its token)

(per channel [L, K] blocks, or for scalar g one row [1, L] per chunk) and the reset counts
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
exp(Pq - Pk_j) masked, times q * k_j, summed over channels; hence the small default chunk
(16) for per-channel g and 64 for scalar g.

Backward, chunks in reverse, dS (the cotangent of the state leaving the chunk) in VMEM scratch,
the chunk's incoming state S read from the forward's saved states [B, H, T'/L, K, V] float32
(K * V * 4 / L bytes per token and head: 4 KiB at K = V = 128, L = 16; 1 KiB at L = 64). With
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
from tessera.kernels.platform import interpret, kernel_platform_reason, target_device
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


def _mm(a, b, dims, cdt):
    """An MXU product of a and b in the input dtype ``cdt`` with float32 accumulation."""
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
    """One chunk's operands and decay factors, shared by the forward and backward kernels."""

    def __init__(self, q_ref, k_ref, v_ref, pq_ref, pk_ref, r_ref, u_ref, channel, bonus):
        self.cdt = q_ref.dtype
        self.q = q_ref[...].astype(F32)  # [L, K]
        self.k = k_ref[...].astype(F32)
        self.v = v_ref[...].astype(F32)  # [L, V]
        n = self.q.shape[0]
        self.n, self.channel, self.bonus = n, channel, bonus
        self.rrow = r_ref[...]  # [1, L]
        self.rcol = _to_col(self.rrow)  # [L, 1]
        r_last = self.rrow[:, n - 1:]  # [1, 1]
        if channel:
            self.pq, self.pk = pq_ref[...], pk_ref[...]  # [L, K]
            self.pl = self.pk[n - 1:, :]  # [1, K]
        else:
            pq_row, self.pk_row = pq_ref[...], pk_ref[...]  # [1, L]
            self.pq_row = pq_row
            self.pq, self.pk = _to_col(pq_row), _to_col(self.pk_row)  # [L, 1]
            self.pl = self.pk_row[:, n - 1:]  # [1, 1]
        self.fq = _exp_le0(self.pq, self.rcol == 0)  # [L, K or 1]
        self.fk = _exp_le0(self.pl - self.pk, self.rcol == r_last)
        self.th = _exp_le0(self.pl, r_last == 0)  # [1, K or 1]
        self.qt = self.q * self.fq
        self.kt = self.k * self.fk
        self.rows = jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0)
        self.lanes = jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)
        self.u = u_ref[...].astype(F32) if bonus else None  # [1, K]
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


def _fwd_kernel(*refs, channel: bool, bonus: bool, scale: float, save: bool):
    """refs: q, k [L, K], v [L, V], Pq, Pk ([L, K] or [1, L]), r [1, L], (u [1, K]), h0 [K, V];
    out: o [L, V], (when ``save``) the incoming state [K, V], the final state [K, V]; scratch
    S [K, V]."""
    q_ref, k_ref, v_ref, pq_ref, pk_ref, r_ref = refs[:6]
    u_ref = refs[6] if bonus else None
    h0_ref, o_ref = refs[6 + bonus:8 + bonus]
    states_ref = refs[8 + bonus] if save else None
    final_ref, s_sc = refs[8 + bonus + save:]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        s_sc[...] = h0_ref[...]

    s = s_sc[...]
    if save:
        states_ref[...] = s
    ch = _Chunk(q_ref, k_ref, v_ref, pq_ref, pk_ref, r_ref, u_ref, channel, bonus)
    o = _mm(ch.scores(), ch.v, NN, ch.cdt) + _mm(ch.qt, s, NN, ch.cdt)
    if bonus:
        o = o + ch.beta * ch.v
    o_ref[...] = (scale * o).astype(o_ref.dtype)
    th = _to_col(ch.th) if channel else ch.th  # [K, 1] or [1, 1]
    s_new = th * s + _mm(ch.kt, ch.v, TN, ch.cdt)
    s_sc[...] = s_new

    @pl.when(c == pl.num_programs(2) - 1)
    def _final():
        final_ref[...] = s_new


def _bwd_kernel(*refs, channel: bool, bonus: bool, scale: float):
    """refs: q, k, v, Pq, Pk, r, (u), the chunk's incoming state [K, V], do [L, V], the final
    state's cotangent [K, V]; out: dq, dk [L, K], dv [L, V], dPq, dPk (as Pq), (du [1, K]),
    dh0 [K, V]; scratch dS [K, V]. Chunks arrive last first."""
    q_ref, k_ref, v_ref, pq_ref, pk_ref, r_ref = refs[:6]
    u_ref = refs[6] if bonus else None
    rest = refs[6 + bonus:]
    s_ref, do_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dpq_ref, dpk_ref = rest[:8]
    du_ref = rest[8] if bonus else None
    dh0_ref, ds_sc = rest[8 + bonus:]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        ds_sc[...] = dfinal_ref[...]

    ds = ds_sc[...]
    s = s_ref[...]
    ch = _Chunk(q_ref, k_ref, v_ref, pq_ref, pk_ref, r_ref, u_ref, channel, bonus)
    cdt = ch.cdt
    do = scale * do_ref[...].astype(F32)  # [L, V]
    da = _mm(do, ch.v, NT, cdt)  # [L, L]
    dq_in, dk_in, a = ch.intra_grads(da)
    dq_x = _mm(do, s, NT, cdt) * ch.fq  # [L, K]: through the incoming state
    dk_x = _mm(ch.v, ds, NT, cdt) * ch.fk  # through the outgoing state
    dq, dk = dq_in + dq_x, dk_in + dk_x
    dv = _mm(a, do, TN, cdt) + _mm(ch.kt, ds, NN, cdt)
    n = ch.n
    last = ch.rows == n - 1  # [L, 1]
    if channel:
        dpq_ref[...] = ch.q * dq
        dth = _to_row(jnp.sum(s * ds, axis=1, keepdims=True))  # [1, K]
        dpl = jnp.sum(ch.k * dk_x, axis=0, keepdims=True) + dth * ch.th
        dpk_ref[...] = -ch.k * dk + jnp.where(last, dpl, 0.0)
        th = _to_col(ch.th)
    else:
        dpq_ref[...] = _to_row(jnp.sum(ch.q * dq, axis=1, keepdims=True))
        dpl = jnp.sum(ch.k * dk_x) + jnp.sum(s * ds) * ch.th  # [1, 1]
        dpk_col = -jnp.sum(ch.k * dk, axis=1, keepdims=True) + jnp.where(last, dpl, 0.0)
        dpk_ref[...] = _to_row(dpk_col)
        th = ch.th
    if bonus:
        dbeta = jnp.sum(do * ch.v, axis=1, keepdims=True)  # [L, 1]
        dq = dq + dbeta * ch.u * ch.k
        dk = dk + dbeta * ch.u * ch.q
        dv = dv + ch.beta * do
        du_ref[...] = jnp.sum(dbeta * ch.q * ch.k, axis=0, keepdims=True)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    ds_in = _mm(ch.qt, do, TN, cdt) + th * ds
    ds_sc[...] = ds_in

    @pl.when(c == pl.num_programs(2) - 1)
    def _first_chunk():
        dh0_ref[...] = ds_in


def _costs(b, h, nc, n, dk, dv, channel, bonus, itemsize, backward):
    """A pl.CostEstimate counted from the kernel's matmuls, elementwise work and exps."""
    chunks = b * h * nc
    mm = 2 * n * n * dk + 2 * n * n * dv + 2 * n * dk * dv * 2  # A, A v, q S, k^T v
    vpu = n * n * dk * 4 if channel else n * n * 3
    exps = n * n * dk + 2 * n * dk if channel else n * n + 2 * n
    io = (2 * n * dk + n * dv) * itemsize + (2 * n * dk if channel else 2 * n) * 4 + 2 * dk * dv * 4
    if backward:
        mm = mm * 2 + 2 * n * dk * dv * 2  # + dA, dS terms
        vpu, io = vpu * 2, io * 2 + n * dv * itemsize
    return pl.CostEstimate(flops=chunks * (mm + vpu), transcendentals=chunks * exps,
                           bytes_accessed=chunks * io)


def _specs(n, dk, dv, channel, bonus, reverse):
    """BlockSpecs of (q, k, v, Pq, Pk, r, [u]) over the grid (b, h, c); chunk c read in reverse
    order when ``reverse``."""
    sq = pl.squeezed

    def at(c, nc):
        return nc - 1 - c if reverse else c

    def tok(nc):
        return lambda b, h, c: (b, h, at(c, nc), 0)

    def row(nc):
        return lambda b, h, c: (b, h, at(c, nc), 0, 0)

    def specs(nc):
        p = (pl.BlockSpec((sq, sq, n, dk), tok(nc)) if channel
             else pl.BlockSpec((sq, sq, sq, 1, n), row(nc)))
        out = [
            pl.BlockSpec((sq, sq, n, dk), tok(nc)),
            pl.BlockSpec((sq, sq, n, dk), tok(nc)),
            pl.BlockSpec((sq, sq, n, dv), tok(nc)),
            p, p,
            pl.BlockSpec((sq, sq, 1, n), lambda b, h, c: (b, at(c, nc), 0, 0)),
        ]
        if bonus:
            out.append(pl.BlockSpec((sq, 1, dk), lambda b, h, c: (h, 0, 0)))
        return out

    return specs


def _state_spec(dk, dv):
    return pl.BlockSpec((pl.squeezed, pl.squeezed, dk, dv), lambda b, h, c: (b, h, 0, 0))


def _chunk_state_spec(dk, dv, nc, reverse):
    return pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, dk, dv),
                        lambda b, h, c: (b, h, nc - 1 - c if reverse else c, 0, 0))


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward(q, k, v, pq, pk, r, u, h0, *, scale, save):
    """The forward pallas_call on the head-major operands: -> (o, states or None, final);
    the incoming states [B, H, T'/L, K, V] only when ``save`` (for the backward)."""
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    n = r.shape[-1]
    nc = tp // n
    channel, bonus = pq.ndim == 4, u is not None
    specs = _specs(n, dk, dv, channel, bonus, reverse=False)(nc)
    args = [q, k, v, pq, pk, r] + ([u] if bonus else []) + [h0]
    out_specs = [pl.BlockSpec((pl.squeezed, pl.squeezed, n, dv), lambda b, h, c: (b, h, c, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, h, tp, dv), v.dtype)]
    if save:
        out_specs.append(_chunk_state_spec(dk, dv, nc, False))
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, dk, dv), F32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, channel=channel, bonus=bonus, scale=scale, save=save),
        grid=(b, h, nc),
        in_specs=specs + [_state_spec(dk, dv)],
        out_specs=out_specs + [_state_spec(dk, dv)],
        out_shape=out_shape + [jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_params(),
        cost_estimate=_costs(b, h, nc, n, dk, dv, channel, bonus, q.dtype.itemsize, False),
        interpret=interpret(),
        name="tessera_gla_fwd",
    )(*args)
    return outs[0], (outs[1] if save else None), outs[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(scale, q, k, v, pq, pk, r, u, h0):
    o, _, final = _forward(q, k, v, pq, pk, r, u, h0, scale=scale, save=False)
    return o, final


def _core_fwd(scale, q, k, v, pq, pk, r, u, h0):
    o, states, final = _forward(q, k, v, pq, pk, r, u, h0, scale=scale, save=True)
    return (o, final), (q, k, v, pq, pk, r, u, states)


def _core_bwd(scale, res, cts):
    q, k, v, pq, pk, r, u, states = res
    do, dfinal = cts
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    n = r.shape[-1]
    nc = tp // n
    channel, bonus = pq.ndim == 4, u is not None
    specs = _specs(n, dk, dv, channel, bonus, reverse=True)(nc)
    tok = specs[:5]  # q, k, v, Pq, Pk: the gradients share their blocks
    out_specs = tok + ([pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, 1, dk),
                                     lambda b, h, c: (b, h, nc - 1 - c, 0, 0))] if bonus else [])
    out_specs.append(_state_spec(dk, dv))
    out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v)]
    out_shape += [jax.ShapeDtypeStruct(a.shape, F32) for a in (pq, pk)]
    if bonus:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, 1, dk), F32))
    out_shape.append(jax.ShapeDtypeStruct((b, h, dk, dv), F32))
    args = [q, k, v, pq, pk, r] + ([u] if bonus else []) + [states, do, dfinal]
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, channel=channel, bonus=bonus, scale=scale),
        grid=(b, h, nc),
        in_specs=specs + [_chunk_state_spec(dk, dv, nc, True),
                          pl.BlockSpec((pl.squeezed, pl.squeezed, n, dv),
                                       lambda b, h, c: (b, h, nc - 1 - c, 0)),
                          _state_spec(dk, dv)],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_params(),
        cost_estimate=_costs(b, h, nc, n, dk, dv, channel, bonus, q.dtype.itemsize, True),
        interpret=interpret(),
        name="tessera_gla_bwd",
    )(*args)
    dq, dk_, dv_, dpq, dpk = outs[:5]
    du = jnp.sum(outs[5], axis=(0, 2)).astype(u.dtype) if bonus else None
    return dq, dk_, dv_, dpq, dpk, jnp.zeros_like(r), du, outs[-1]


_core.defvjp(_core_fwd, _core_bwd)


def _per_shard(q, k, v, g, u, h0, reset, *, scale, n):
    """One device's rows and heads, in gla's layout -> (o [B, T, H, V], final [B, H, K, V])."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    nc = -(-t // n)
    tp = nc * n
    channel = g.ndim == 4

    def heads_first(a):  # [B, T, H, ...] -> [B, H, T', ...], zero padded
        a = jnp.pad(a, [(0, 0), (0, tp - t)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a, 2, 1)

    gc = heads_first(g.astype(F32) if channel else g.astype(F32)[..., None])
    gc = gc.reshape(b, h, nc, n, gc.shape[-1])
    pk = jnp.cumsum(gc, axis=3)
    pq = pk if u is None else jnp.pad(pk[:, :, :, :-1], [(0, 0)] * 3 + [(1, 0), (0, 0)])
    if channel:
        pq, pk = (p.reshape(b, h, tp, dk) for p in (pq, pk))
    else:
        pq, pk = (p.reshape(b, h, nc, 1, n) for p in (pq, pk))
    reset = jnp.zeros((b, t), bool) if reset is None else reset
    reset = jnp.pad(reset, [(0, 0), (0, tp - t)]).astype(jnp.int32).reshape(b, nc, n)
    r = jnp.cumsum(reset, axis=2).astype(F32)[:, :, None, :]  # [B, nc, 1, L]
    h0 = jnp.zeros((b, h, dk, dv), F32) if h0 is None else h0.astype(F32)
    u = None if u is None else u[:, None, :]
    o, final = _core(scale, heads_first(q), heads_first(k), heads_first(v), pq, pk, r, u, h0)
    return jnp.moveaxis(o, 1, 2)[:, :t], final


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
