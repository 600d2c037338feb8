"""RWKV-7's generalised delta rule on TPU (Pallas Mosaic), forward and backward kernels.

Semantics, shapes and the chunked WY / UT-transform derivation are those of `reference`:
S_t = (diag(exp w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T r_t, per batch row and
head, with resets zeroing the state before a token.

Layout. r, w, k, a, b [B, T, H, K] and v, o [B, T, H, V] are read in place as [B, T, H * K] (a
free reshape): a block is [L, hb * K], L tokens of hb heads, hb the fewest heads whose features
fill whole 128-lane tiles (2 heads of 64 for RWKV-7), all heads when none do. The kernel keeps
the TRANSPOSED state S^T [V, K] (decays then scale lanes); h0 and the final state are transposed
in the wrapper (O(state), not O(T)). reset arrives as float [B, T, 1] (a column per block).
T is not padded: the last chunk's rows past T are masked in the kernel to a padding token
(w = 0, r = k = v = a = b = 0, no reset), which keeps the state, and their outputs are dropped.

Grid (batch "parallel", head group "parallel", chunk "arbitrary"): the chunk axis walks the
sequence in order with S^T for each head of the group in VMEM scratch (float32).

Per chunk (`_chunk`, float32 throughout, matmuls on the MXU at HIGHEST precision):
  G = tril(1) @ w (inclusive cumulative log decay), G_ = G - w, n = tril(1) @ reset (resets so far).
  Pair scores: the L^2 (i, j) pairs are the rows of [L^2, K] slabs (a view of [L, L, K]); x_i
  broadcast down j and x_j broadcast down i give, per channel (VPU and EUP work),
    D_incl = exp(where(j <= i and n_i == n_j, G_i - G_j, -inf)),
    D_strict = exp(where(j < i and n_i == n_j, G__i - G_j, -inf)),
  every exponent a log-decay difference <= 0 (never exp(-G_j)); a score matrix [L, L] is the sum
  over the K channels of a product slab:
    A_rk = sum_c r_i k_j D_incl, A_rb = sum_c r_i b_j D_incl,
    A_ak = sum_c a_i k_j D_strict, A_ab = sum_c a_i b_j D_strict.
  (I - A_ab)^-1 = (I + N)(I + N^2)(I + N^4)... (log2 L factors, N = A_ab nilpotent).
  With W = a exp(G_ | n == 0), R = r exp(G | n == 0) (masked to -inf where a reset precedes):
    u = (I - A_ab)^-1 (A_ak v + W S_0)                          (u_i = S_{i-1}^T a_i, [L, V])
    o = scale (A_rk v + A_rb u + R S_0)
    S_L = exp(G_L | n_L == 0) S_0 + sum_j exp(G_L - G_j | n_j == n_L) (k_j v_j^T + b_j u_j^T).

Backward. The loss reaches the chunk c through its outputs o_c and its end state S_{c+1}, which
is the next chunk's S_0; the chunk map F_c: (S_0, r, w, k, v, a, b) -> (o, S_L) is the function
above, so by the chain rule, sweeping chunks in reverse with dS (the cotangent of S_L) in VMEM:
    (dS_0, dr, dw, dk, dv, da, db)_c = F_c'(S_0c, inputs_c)^T (do_c, dS_L),   dS_L <- dS_0,
starting from dS_L = d(final state) at the last chunk and ending with dh0 = dS_0 of chunk 0.
The chunk's own adjoint F_c'^T is reverse-mode of `_chunk` inside the kernel (`jax.vjp` traced
into the Mosaic body: the same ops transposed, so forward and backward share one formula):
with X = (I - A_ab)^-1 and Y = A_ak v + W S_0 (u = X Y), its key steps are
    dX = du Y^T, dY = X^T du; dA_ab = X^T dX X^T (strictly lower part; X = (I - A_ab)^-1),
    dA_ak = dY v^T, dW = dY S_0^T, dS_0 += W^T dY + R^T do' + exp(G_L) dS_L, ...
    a pair score's cotangent dA_ij spreads to both vectors and to the decay:
    d(left_i) += dA_ij right_j D_ij, d(right_j) += dA_ij left_i D_ij, dG_i += dA_ij x_ij,
    dG_j -= dA_ij x_ij (x_ij = left_i right_j D_ij, per channel; G__i for the strict pairs), and
    dw = tril(1)^T (dG + dG_) - dG_ (G = tril(1) w, G_ = G - w);
masked pairs carry exp(-inf) = 0 and a zero cotangent, so no inf or NaN arises. The forward
saves each chunk's incoming state S_0 [B, H, T / L, V, K] float32 (K V / L floats per token and
head: 256 at K = V = 64, L = 16) and the backward recomputes the chunk from it.

Cost estimates (`pl.CostEstimate`) are the jaxpr op counts of `_chunk` (and of its vjp, which
includes the recompute) per chunk and head, times the grid, plus the HBM bytes of every block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tessera.kernels.delta_rule.reference import check_inputs
from tessera.kernels.platform import heads_filling_lanes, interpret, kernel_platform_reason
from tessera.sharding.kernels import shard_map_kernel

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_CHUNK = 16
SUBLANES = 16  # a chunk is a multiple of this (bf16 tiles are 16 rows)
MAX_CHUNK = 32  # at 64 the backward's [L^2, K] slabs overflow the 16 MiB of scoped VMEM


def _chunk_reason(chunk: int) -> str | None:
    if chunk < 1 or chunk % SUBLANES or chunk > MAX_CHUNK:
        return f"chunk_size = {chunk} is not 16 or 32 (a multiple of {SUBLANES}, <= {MAX_CHUNK})"
    return None


def supports(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, *args, **kw) -> str | None:
    """None when the kernel can run these inputs, else why not (static facts only)."""
    reason = kernel_platform_reason("tpu")
    if reason is not None:
        return reason
    chunk = kw.get("chunk_size")
    return None if chunk is None else _chunk_reason(chunk)


def _dot(x: jax.Array, y: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """x @ y contracting x's dim contract[0] with y's dim contract[1], float32 in full."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(x, y, dims, precision=HIGHEST, preferred_element_type=F32)


def _chunk(s0t, r, w, k, v, a, b, rst, *, scale: float):
    """One chunk of one head, float32: S_0^T [V, K], r, w, k, a, b [L, K], v [L, V], rst [L, 1]
    (1.0 where the state is zeroed before the token) -> (o [L, V], S_L^T [V, K]). The math is
    the module docstring's."""
    size = r.shape[0]
    pairs = size * size
    row = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    tri = (row >= col).astype(F32)
    g = _dot(tri, w)  # G_i inclusive
    g_before = g - w  # G_{i-1}
    n = _dot(tri, rst)  # resets so far in the chunk [L, 1]

    # Pair (i, j) = row i * L + j of the [L^2, K] slabs (a free view of [L, L, K]).
    p = jax.lax.broadcasted_iota(jnp.int32, (pairs, 1), 0)
    pi, pj = p // size, p % size
    sel = jax.lax.broadcasted_iota(jnp.int32, (pairs, size), 1)
    ei, ej = (pi == sel).astype(F32), (pj == sel).astype(F32)  # 0/1 selectors [L^2, L]

    def left(x: jax.Array) -> jax.Array:  # row (i, j) holds x_i
        return jnp.broadcast_to(x[:, None, :], (size, *x.shape)).reshape(pairs, x.shape[1])

    def right(x: jax.Array) -> jax.Array:  # row (i, j) holds x_j
        return jnp.broadcast_to(x[None], (size, *x.shape)).reshape(pairs, x.shape[1])

    def scores(x: jax.Array) -> jax.Array:  # [L^2, K] -> [L, L]: sums over the K channels
        return jnp.sum(x.reshape(size, size, x.shape[1]), axis=2)

    same = _dot(ei, n) == _dot(ej, n)  # no reset between j and i [L^2, 1]
    g_j = right(g)
    d_incl = jnp.exp(jnp.where(same & (pi >= pj), left(g) - g_j, -jnp.inf))
    d_strict = jnp.exp(jnp.where(same & (pi > pj), left(g_before) - g_j, -jnp.inf))
    r_i, a_i = left(r) * d_incl, left(a) * d_strict
    k_j, b_j = right(k), right(b)

    a_rk, a_rb = scores(r_i * k_j), scores(r_i * b_j)
    a_ak, a_ab = scores(a_i * k_j), scores(a_i * b_j)

    inverse = (row == col).astype(F32) + a_ab  # (I - A_ab)^-1 by doubling
    power, span = a_ab, 2
    while span < size:
        power = _dot(power, power)
        inverse = inverse + _dot(power, inverse)
        span *= 2

    start = n == 0  # S_0 reaches the token
    w_in = a * jnp.exp(jnp.where(start, g_before, -jnp.inf))
    r_in = r * jnp.exp(jnp.where(start, g, -jnp.inf))
    u = _dot(inverse, _dot(a_ak, v) + _dot(w_in, s0t, (1, 1)))  # [L, V]
    o = scale * (_dot(a_rk, v) + _dot(a_rb, u) + _dot(r_in, s0t, (1, 1)))

    last = (jax.lax.broadcasted_iota(jnp.int32, (1, size), 1) == size - 1).astype(F32)
    g_end, n_end = _dot(last, g), _dot(last, n)  # [1, K], [1, 1]
    to_end = jnp.exp(jnp.where(n == n_end, g_end - g, -jnp.inf))  # [L, K]
    through = jnp.exp(jnp.where(n_end == 0, g_end, -jnp.inf))  # [1, K]
    s_end = through * s0t + _dot(v, k * to_end, (0, 0)) + _dot(u, b * to_end, (0, 0))
    return o, s_end


def _load(refs, h: int, dk: int, dv: int, valid):
    """Head h's float32 r, w, k, v, a, b rows of the chunk (rows past T zeroed)."""
    out = []
    for i, ref in enumerate(refs):
        d = dv if i == 3 else dk
        x = ref[:, h * d:(h + 1) * d].astype(F32)
        out.append(x if valid is None else jnp.where(valid, x, 0.0))
    return out


def _valid_rows(size: int, t: int, chunk_index):
    """bool [L, 1]: rows of chunk ``chunk_index`` before T; None when T is a multiple of L."""
    if t % size == 0:
        return None
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, 1), 0)
    return rows < t - chunk_index * size


def _fwd_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, rst_ref, h0_ref, o_ref, *refs,
                t: int, scale: float, save: bool):
    """Blocks: inputs [L, hb * K] ([L, hb * V] for v), rst [L, 1], h0^T [hb, V, K]; outputs
    o [L, hb * V], (when ``save``) the chunk's incoming states [hb, V, K], the final state
    [hb, V, K]; scratch S^T [hb, V, K]."""
    states_ref, final_ref, s_sc = refs if save else (None, *refs)
    c = pl.program_id(2)
    hb, dv, dk = s_sc.shape
    size = r_ref.shape[0]

    @pl.when(c == 0)
    def _init():
        s_sc[...] = h0_ref[...]

    valid = _valid_rows(size, t, c)
    rst = rst_ref[...] if valid is None else jnp.where(valid, rst_ref[...], 0.0)
    for h in range(hb):
        xs = _load((r_ref, w_ref, k_ref, v_ref, a_ref, b_ref), h, dk, dv, valid)
        s0t = s_sc[h]
        if save:
            states_ref[h] = s0t
        o, s_end = _chunk(s0t, *xs, rst, scale=scale)
        o_ref[:, h * dv:(h + 1) * dv] = o.astype(o_ref.dtype)
        s_sc[h] = s_end

    @pl.when(c == pl.num_programs(2) - 1)
    def _finish():
        final_ref[...] = s_sc[...]


def _bwd_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, rst_ref, states_ref, do_ref, dfinal_ref,
                dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref, dh0_ref, ds_sc, *, t: int,
                scale: float):
    """The grid walks chunks last to first. Blocks as `_fwd_kernel`'s, plus do [L, hb * V] and
    d(final state)^T [hb, V, K]; outputs the input gradients [L, hb * K] ([L, hb * V] for v) and
    dh0^T [hb, V, K]; scratch dS^T [hb, V, K] (the cotangent of the chunk's end state)."""
    step = pl.program_id(2)
    chunks = pl.num_programs(2)
    hb, dv, dk = ds_sc.shape
    size = r_ref.shape[0]

    @pl.when(step == 0)
    def _init():
        ds_sc[...] = dfinal_ref[...]

    valid = _valid_rows(size, t, chunks - 1 - step)
    rst = rst_ref[...] if valid is None else jnp.where(valid, rst_ref[...], 0.0)
    outs = (dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref)
    for h in range(hb):
        xs = _load((r_ref, w_ref, k_ref, v_ref, a_ref, b_ref), h, dk, dv, valid)
        do = do_ref[:, h * dv:(h + 1) * dv].astype(F32)
        if valid is not None:
            do = jnp.where(valid, do, 0.0)
        _, vjp = jax.vjp(functools.partial(_chunk, rst=rst, scale=scale), states_ref[h], *xs)
        ds0, *grads = vjp((do, ds_sc[h]))
        for i, (ref, g) in enumerate(zip(outs, grads)):
            d = dv if i == 3 else dk
            ref[:, h * d:(h + 1) * d] = g.astype(ref.dtype)
        ds_sc[h] = ds0

    @pl.when(step == chunks - 1)
    def _finish():
        dh0_ref[...] = ds_sc[...]


@functools.lru_cache(maxsize=64)
def _chunk_cost(size: int, dk: int, dv: int, backward: bool) -> tuple[int, int]:
    """(flops, transcendentals) of one chunk of one head: the jaxpr op counts of `_chunk` (or of
    its vjp, recompute included)."""
    mat = jax.ShapeDtypeStruct
    args = (mat((dv, dk), F32), *(mat((size, d), F32) for d in (dk, dk, dk, dv, dk, dk)))
    rst = mat((size, 1), F32)
    fn = functools.partial(_chunk, scale=1.0)
    if backward:
        def fn(s0t, r, w, k, v, a, b, rst):  # noqa: F811 (the vjp of the same chunk)
            out, vjp = jax.vjp(functools.partial(_chunk, rst=rst, scale=1.0), s0t, r, w, k, v, a, b)
            return vjp(out)
    cost = pl.estimate_cost(fn, *args, rst)
    return int(cost.flops), int(cost.transcendentals)


def _layout(r, v):
    bsz, t, h, dk = r.shape
    dv = v.shape[3]
    return bsz, t, h, dk, dv, heads_filling_lanes(h, (dk, dv))


def _specs(size, hb, dk, dv, chunk_map):
    """BlockSpecs of the token-major arrays for a grid (b, head group, step)."""
    sq = pl.squeezed

    def tokens(bi, j, s):
        return bi, chunk_map(s), j

    def column(bi, j, s):
        return bi, chunk_map(s), 0

    def state(bi, j, s):
        return bi, j, 0, 0

    def saved(bi, j, s):
        return bi, j, chunk_map(s), 0, 0

    keys = pl.BlockSpec((sq, size, hb * dk), tokens)
    values = pl.BlockSpec((sq, size, hb * dv), tokens)
    return dict(
        keys=keys,
        values=values,
        reset=pl.BlockSpec((sq, size, 1), column),
        state=pl.BlockSpec((sq, hb, dv, dk), state),
        saved=pl.BlockSpec((sq, hb, sq, dv, dk), saved),
    )


def _fwd_shard(r, w, k, v, a, b, h0t, rst, *, size: int, scale: float, save: bool):
    """One device's rows and heads: [B, T, H, *] inputs, h0^T [B, H, V, K], rst float [B, T, 1]
    -> (o [B, T, H, V], final state^T [B, H, V, K], and when ``save`` the incoming states
    [B, H, C, V, K] of the chunks)."""
    bsz, t, h, dk, dv, hb = _layout(r, v)
    chunks = pl.cdiv(t, size)
    spec = _specs(size, hb, dk, dv, lambda s: s)
    flops, trans = _chunk_cost(size, dk, dv, False)
    units = bsz * h * chunks
    io_bytes = t * bsz * h * (5 * dk * r.dtype.itemsize + 2 * dv * v.dtype.itemsize) + 4 * bsz * t
    state_bytes = 4 * bsz * h * dv * dk * ((chunks if save else 0) + 2)
    saved_spec = [spec["saved"]] if save else []
    saved_shape = [jax.ShapeDtypeStruct((bsz, h, chunks, dv, dk), F32)] if save else []
    o, *saved, final = pl.pallas_call(
        functools.partial(_fwd_kernel, t=t, scale=scale, save=save),
        grid=(bsz, h // hb, chunks),
        in_specs=[spec["keys"]] * 3 + [spec["values"]] + [spec["keys"]] * 2
        + [spec["reset"], spec["state"]],
        out_specs=[spec["values"], *saved_spec, spec["state"]],
        out_shape=[
            jax.ShapeDtypeStruct((bsz, t, h * dv), v.dtype),
            *saved_shape,
            jax.ShapeDtypeStruct((bsz, h, dv, dk), F32),
        ],
        scratch_shapes=[pltpu.VMEM((hb, dv, dk), F32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=units * flops, transcendentals=units * trans,
            bytes_accessed=io_bytes + state_bytes,
        ),
        interpret=interpret(),
        name="tessera_delta_rule_fwd",
    )(
        *(x.reshape(bsz, t, h * x.shape[3]) for x in (r, w, k, v, a, b)), rst, h0t,
    )
    return (o.reshape(bsz, t, h, dv), final, *saved)


def _bwd_shard(r, w, k, v, a, b, rst, saved, do, dfinal_t, *, size: int, scale: float):
    """One device's backward: the forward's inputs, its saved states, do [B, T, H, V] and
    d(final)^T [B, H, V, K] -> (dr, dw, dk, dv, da, db in the inputs' layouts and dtypes,
    dh0^T [B, H, V, K] float32)."""
    bsz, t, h, dk, dv, hb = _layout(r, v)
    chunks = pl.cdiv(t, size)
    spec = _specs(size, hb, dk, dv, lambda s: chunks - 1 - s)
    flops, trans = _chunk_cost(size, dk, dv, True)
    units = bsz * h * chunks
    io_bytes = 2 * t * bsz * h * (5 * dk * r.dtype.itemsize + 2 * dv * v.dtype.itemsize)
    state_bytes = 4 * bsz * h * dv * dk * (chunks + 2)
    grads = pl.pallas_call(
        functools.partial(_bwd_kernel, t=t, scale=scale),
        grid=(bsz, h // hb, chunks),
        in_specs=[spec["keys"]] * 3 + [spec["values"]] + [spec["keys"]] * 2
        + [spec["reset"], spec["saved"], spec["values"], spec["state"]],
        out_specs=[spec["keys"]] * 3 + [spec["values"]] + [spec["keys"]] * 2 + [spec["state"]],
        out_shape=[
            *(jax.ShapeDtypeStruct((bsz, t, h * x.shape[3]), x.dtype) for x in (r, w, k, v, a, b)),
            jax.ShapeDtypeStruct((bsz, h, dv, dk), F32),
        ],
        scratch_shapes=[pltpu.VMEM((hb, dv, dk), F32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=units * flops, transcendentals=units * trans,
            bytes_accessed=io_bytes + state_bytes + 4 * bsz * t,
        ),
        interpret=interpret(),
        name="tessera_delta_rule_bwd",
    )(
        *(x.reshape(bsz, t, h * x.shape[3]) for x in (r, w, k, v, a, b)), rst, saved,
        do.reshape(bsz, t, h * dv), dfinal_t,
    )
    *dx, dh0t = grads
    return (*(g.reshape(x.shape) for g, x in zip(dx, (r, w, k, v, a, b))), dh0t)


TOKENS = ("batch", None, "act_heads", None)
STATE = ("batch", "act_heads", None, None)
SAVED = ("batch", "act_heads", None, None, None)
RESET = ("batch", None, None)


def _run_fwd(size, scale, save, r, w, k, v, a, b, h0t, rst):
    run = shard_map_kernel(
        functools.partial(_fwd_shard, size=size, scale=scale, save=save),
        in_axes=(TOKENS,) * 6 + (STATE, RESET),
        out_axes=(TOKENS, STATE, SAVED) if save else (TOKENS, STATE),
    )
    return run(r, w, k, v, a, b, h0t, rst)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _delta(size, scale, r, w, k, v, a, b, h0t, rst):
    """The primal (no gradient taken): the forward kernel without saved states."""
    return _run_fwd(size, scale, False, r, w, k, v, a, b, h0t, rst)


def _delta_fwd(size, scale, r, w, k, v, a, b, h0t, rst):
    o, final, saved = _run_fwd(size, scale, True, r, w, k, v, a, b, h0t, rst)
    return (o, final), (r, w, k, v, a, b, rst, saved)


def _delta_bwd(size, scale, res, cotangents):
    r, w, k, v, a, b, rst, saved = res
    do, dfinal_t = cotangents
    run = shard_map_kernel(
        functools.partial(_bwd_shard, size=size, scale=scale),
        in_axes=(TOKENS,) * 6 + (RESET, SAVED, TOKENS, STATE),
        out_axes=(TOKENS,) * 6 + (STATE,),
    )
    grads = run(r, w, k, v, a, b, rst, saved, do.astype(v.dtype), dfinal_t.astype(F32))
    return (*grads, jnp.zeros_like(rst))


_delta.defvjp(_delta_fwd, _delta_bwd)


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
    """`reference.sequential`'s semantics with the Pallas kernels (differentiable wrt r, w, k, v,
    a, b and h0): r, w, k, a, b [B, T, H, K], v [B, T, H, V], h0 [B, H, K, V] or None, reset bool
    [B, T] or None -> (o [B, T, H, V] in v.dtype, final state [B, H, K, V] float32). Chunks of
    ``chunk_size`` tokens (16, the default, or 32; one chunk of T when T is shorter)."""
    check_inputs(r, w, k, v, a, b, h0, reset)
    chunk = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if _chunk_reason(chunk):
        raise ValueError(f"delta_rule: {_chunk_reason(chunk)}")
    bsz, t, h, dk = r.shape
    dv = v.shape[3]
    size = min(chunk, t)
    h0t = jnp.zeros((bsz, h, dv, dk), F32) if h0 is None else jnp.swapaxes(h0.astype(F32), 2, 3)
    rst = jnp.zeros((bsz, t, 1), F32) if reset is None else reset.astype(F32)[..., None]
    o, final_t = _delta(size, float(scale), r, w, k, v, a, b, h0t, rst)
    return o, jnp.swapaxes(final_t, 2, 3)


def flops_per_token(size: int, dk: int, dv: int) -> float:
    """Forward + backward FLOPs per token and head as the kernels count them (`_chunk_cost`)."""
    fwd, _ = _chunk_cost(size, dk, dv, False)
    bwd, _ = _chunk_cost(size, dk, dv, True)
    return (fwd + bwd) / size


__all__ = ["delta_rule", "flops_per_token", "supports"]
