"""The routed experts of a mixture-of-experts layer in plain jnp: the dense reference (every
expert on every token) and the dropless ragged dispatch (sort by expert, grouped matmuls).

Both compute, for tokens x [N, D], their assignments ``expert_ids`` int32 [N, K] and combine
``weights`` [N, K]:

    y[n] = sum_k weights[n, k] * FFN_{expert_ids[n, k]}(x[n])
    FFN_e(x) = (silu(x @ wi_gate[e]) * (x @ wi_up[e])) @ wo[e]

with ``wi_gate``, ``wi_up`` [E, D, F] and ``wo`` [E, F, D]. An id equal to E (or larger) is an
assignment to no expert (padding, or dropped by capacity): it contributes zero whatever its
weight. Expert outputs are computed in x's dtype and combined in float32; y has x's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def dense(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    wi_gate: jax.Array,
    wi_up: jax.Array,
    wo: jax.Array,
) -> jax.Array:
    """Every expert on every token, combined with zero weight where not selected: the oracle.
    E times the active FLOPs, and an [N, E, F] hidden."""
    e = wi_gate.shape[0]
    combine = jnp.einsum(
        "nke,nk->ne", jax.nn.one_hot(expert_ids, e, dtype=jnp.float32), weights.astype(jnp.float32)
    )
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, wi_gate)) * jnp.einsum("nd,edf->nef", x, wi_up)
    out = jnp.einsum("nef,efd->ned", h, wo)
    return jnp.einsum("ned,ne->nd", out.astype(jnp.float32), combine).astype(x.dtype)


def grouped_ffn(
    xs: jax.Array, group_sizes: jax.Array, wi_gate: jax.Array, wi_up: jax.Array, wo: jax.Array
) -> jax.Array:
    """The SwiGLU experts on rows grouped by expert: xs [M, D] whose first ``group_sizes[0]``
    rows go to expert 0, the next ``group_sizes[1]`` to expert 1, ... (``jax.lax.ragged_dot``).
    Rows past ``sum(group_sizes)`` belong to no expert; their output is not meaningful."""
    # bf16 operands: an explicit DEFAULT precision. It computes what HIGHEST would (bf16 products
    # are exact, accumulation is float32), and TPU's ragged-dot kernel fails to compile bf16
    # under HIGHEST ("Bad lhs type", jax 0.12), which a global jax_default_matmul_precision
    # would otherwise ask for.
    precision = jax.lax.Precision.DEFAULT if xs.dtype == jnp.bfloat16 else None
    dot = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes, precision=precision)
    return dot(jax.nn.silu(dot(xs, wi_gate)) * dot(xs, wi_up), wo)


def rank_in_group(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order, rank) for int keys [..., M]: ``order`` sorts each row by key (stable), and
    ``rank[..., i]`` is how many entries before i in that order share its key (0, 1, 2, ...
    within each key). Used to give assignments their slot in a per-expert buffer."""
    order = jnp.argsort(keys, axis=-1, stable=True)
    ordered = jnp.take_along_axis(keys, order, axis=-1)
    index = jnp.broadcast_to(jnp.arange(keys.shape[-1], dtype=jnp.int32), keys.shape)
    first = jnp.concatenate(
        [jnp.ones_like(ordered[..., :1], bool), ordered[..., 1:] != ordered[..., :-1]], axis=-1
    )
    start = jax.lax.cummax(jnp.where(first, index, 0), axis=keys.ndim - 1)
    rank_sorted = index - start
    rank = jnp.zeros_like(rank_sorted)
    rank = jnp.put_along_axis(rank, order, rank_sorted, axis=-1, inplace=False)
    return order, rank


def ragged(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    wi_gate: jax.Array,
    wi_up: jax.Array,
    wo: jax.Array,
    *,
    ffn: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """Dropless dispatch: the N * K assignments sorted by expert (no-expert ids last), each
    expert's rows through ``grouped_ffn`` (or ``ffn``, same signature: another grouped-matmul
    kernel), unsorted, combined by the weights."""
    n, k = expert_ids.shape
    e = wi_gate.shape[0]
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.zeros((e,), jnp.int32).at[flat].add(1, mode="drop")
    ys = (ffn or grouped_ffn)(x[order // k], group_sizes, wi_gate, wi_up, wo)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    out = jnp.where((flat < e)[:, None], ys[inverse], 0).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", out.astype(jnp.float32), weights.astype(jnp.float32)).astype(
        x.dtype
    )
