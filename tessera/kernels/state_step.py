"""One-token state update on TPU (Pallas Mosaic): the decode step of the matrix-state recurrences,
reading the state once and writing it once, in place.

Per batch row and head, with the state S [K, V] float32:

    delta rule (RWKV-7; a, b given)   S' = diag(exp w) S + b (a^T S) + k v^T,  o = scale S'^T r
    gla, inclusive (GLA, RetNet)      S' = diag(exp w) S + k v^T,              o = scale S'^T r
    gla with the bonus u (RWKV-6)     S' = diag(exp w) S + k v^T,
                                      o = scale (S + diag(u) k v^T)^T r

after ``reset`` (zero the state before the token). r, k, w, a, b [B, 1, H, K] (w may be one
scalar per head, [B, 1, H], for gla), v [B, 1, H, V], u [H, K], h0 [B, H, K, V] (zeros when None)
-> (o [B, 1, H, V] in v's dtype, S' [B, H, K, V] float32).

Why a kernel: XLA's T = 1 step (the ops' ``sequential`` form) moves, per the AOT cost analysis on
v5p (`docs/design.md`, "Recurrence kernels"), 7-11x the bytes of reading and writing the state
once for the delta rule and 2x for RWKV-6 (it materialises the [K, V] intermediates), while
SSD's and retention's steps are already within 8% of it. Decode is bound by memory bandwidth,
so only the first two register this kernel.

Grid (batch, head blocks), both parallel; a block is ``hb`` heads' whole states [hb, K, V] (K on
sublanes, V on lanes) and their vectors as rows [hb, K] / [hb, V] (heads on sublanes: no lane
padding in HBM, where a [K, 1] column would take 128 lanes per element). The kernel transposes
the per-key rows to columns once, and per head every product is a broadcast and the contraction
over K a sublane reduction. The state's
output aliases its input (``input_output_aliases``): with a donated cache the update is in
place. Reset flags come by scalar prefetch. No gradient (decode does not train).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tessera.kernels.platform import interpret, kernel_platform_reason
from tessera.sharding.kernels import shard_map_kernel

F32 = jnp.float32
# Heads per block: whole states of at most this many bytes (in + out, double-buffered: 4x).
BLOCK_BYTES = 2 * 1024**2


def supports(r: jax.Array, *args, **kw) -> str | None:
    """None for a single token on TPU (or in interpret mode), else why not."""
    reason = kernel_platform_reason("tpu")
    if reason is not None:
        return reason
    if r.shape[1] != 1:
        return f"decode only: T = {r.shape[1]} > 1"
    return None


def _heads_per_block(h: int, dk: int, dv: int) -> int:
    """All heads if their states fit BLOCK_BYTES, else the largest fitting divisor of H that is
    a multiple of 8 (a block's second-minor dim), else 8's smallest multiple dividing H, else H."""
    if h * dk * dv * 4 <= BLOCK_BYTES:
        return h
    fits = [d for d in range(8, h, 8) if h % d == 0 and d * dk * dv * 4 <= BLOCK_BYTES]
    if fits:
        return max(fits)
    divisors = [d for d in range(8, h, 8) if h % d == 0]
    return min(divisors) if divisors else h


def _kernel(reset_ref, s_ref, r_ref, k_ref, v_ref, w_ref, *refs, low_rank: bool, bonus: bool,
            scale: float):
    """refs: [a_ref, b_ref] if low_rank, [u_ref] if bonus, then o_ref [hb, V] and the new
    state's ref [hb, K, V]. Vectors come as rows [hb, K] (heads on sublanes; w may be [hb, 1]),
    v as [hb, V]. The per-key vectors are transposed once to columns [K, hb] (the XLU), so that
    head h's column [K, 1] broadcasts along its state's lanes."""
    a_ref, b_ref = refs[:2] if low_rank else (None, None)
    u_ref = refs[2 if low_rank else 0] if bonus else None
    o_ref, out_ref = refs[-2:]
    keep = (reset_ref[pl.program_id(0)] == 0).astype(F32)

    def columns(ref):
        return None if ref is None else ref[...].astype(F32).T  # [K, hb]

    r, k, w, a, b, u = (columns(ref) for ref in (r_ref, k_ref, w_ref, a_ref, b_ref, u_ref))
    v = v_ref[...].astype(F32)  # [hb, V]
    for h in range(s_ref.shape[0]):
        s = s_ref[h] * keep  # [K, V]
        kv = k[:, h:h + 1] * v[h:h + 1, :]
        new = jnp.exp(w[:, h:h + 1]) * s + kv
        if low_rank:
            sa = jnp.sum(a[:, h:h + 1] * s, axis=0, keepdims=True)  # a^T S: [1, V]
            new = new + b[:, h:h + 1] * sa
        read = s + u[:, h:h + 1] * kv if bonus else new
        o_ref[h:h + 1, :] = (scale * jnp.sum(r[:, h:h + 1] * read, axis=0, keepdims=True)
                             ).astype(o_ref.dtype)
        out_ref[h] = new


def _per_shard(reset, s, r, k, v, w, a, b, u, *, scale: float):
    """One device's rows and heads. Shapes as `step` with T dropped (reset int32 [B], vectors
    [B, H, K], w [B, H, K or 1], u [H, K])."""
    bsz, h, dk, dv = s.shape
    low_rank, bonus = a is not None, u is not None
    hb = _heads_per_block(h, dk, dv)
    sq = pl.squeezed

    def rows(i, j, reset_ref):
        return i, j, 0

    def vector(width):
        return pl.BlockSpec((sq, hb, width), rows)

    extra = [a, b] if low_rank else []
    extra_specs = [vector(dk), vector(dk)] if low_rank else []
    if bonus:
        extra.append(u)
        extra_specs.append(pl.BlockSpec((hb, dk), lambda i, j, reset_ref: (j, 0)))
    state_spec = pl.BlockSpec((sq, hb, dk, dv), lambda i, j, reset_ref: (i, j, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(bsz, h // hb),
        in_specs=[state_spec, vector(dk), vector(dk), vector(dv), vector(w.shape[2]),
                  *extra_specs],
        out_specs=[vector(dv), state_spec],
    )
    state_bytes = bsz * h * dk * dv * 4
    o, new = pl.pallas_call(
        functools.partial(_kernel, low_rank=low_rank, bonus=bonus, scale=scale),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((bsz, h, dv), v.dtype),
                   jax.ShapeDtypeStruct(s.shape, F32)],
        input_output_aliases={1: 1},  # operand 1 (after the prefetched resets) is the state
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=pl.CostEstimate(
            flops=bsz * h * dk * dv * (8 if low_rank else 5),
            transcendentals=bsz * h * w.shape[2],
            bytes_accessed=2 * state_bytes + sum(
                x.size * x.dtype.itemsize for x in (r, k, v, w, *extra)),
        ),
        interpret=interpret(),
        name="tessera_state_step",
    )(reset, s, r, k, v, w, *extra)
    return o, new


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _step(scale, reset, s, r, k, v, w, a, b, u):
    vec = ("batch", "act_heads", None)
    run = shard_map_kernel(
        functools.partial(_per_shard, scale=scale),
        in_axes=(("batch",), (*vec, None), vec, vec, vec, vec, vec, vec, ("act_heads", None)),
        out_axes=(vec, (*vec, None)),
    )
    return run(reset, s, r, k, v, w, a, b, u)


def _step_fwd(scale, *args):
    return _step(scale, *args), None


def _step_bwd(scale, res, g):
    raise NotImplementedError(
        "the Pallas state-step kernel (impl 'pallas_tpu_decode') has no gradient (decode does "
        "not train); use impl='sequential' to differentiate a single step"
    )


_step.defvjp(_step_fwd, _step_bwd)


def step(
    r: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    *,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    u: jax.Array | None = None,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One token's update (shapes and forms in the module docstring); the caller has checked
    the shapes. a and b come together; u excludes them."""
    if (a is None) != (b is None) or (u is not None and a is not None):
        raise ValueError("state_step: give a and b together, or u alone")
    bsz, _, h, dk = r.shape
    dv = v.shape[3]
    s = jnp.zeros((bsz, h, dk, dv), F32) if h0 is None else h0.astype(F32)
    flags = jnp.zeros((bsz,), jnp.int32) if reset is None else reset[:, 0].astype(jnp.int32)

    def row(x: jax.Array | None) -> jax.Array | None:  # [B, 1, H, ...] -> [B, H, ...]
        return None if x is None else x[:, 0]

    w = w[..., None] if w.ndim == 3 else w
    o, state = _step(scale, flags, s, row(r), row(k), row(v), row(w), row(a), row(b), u)
    return o[:, None], state
