"""The routed experts over the active mesh: each device dispatches its own tokens, and with
expert parallelism (the ``experts`` logical axis on a mesh axis of size S > 1) the assignments
travel to the devices holding their experts and back.

``dispatch(x, expert_ids, weights, wi_gate, wi_up, wo, capacity=, impl=)`` runs under
``jax.shard_map`` over the whole mesh. Tokens keep their sharding (``batch`` x ``length``), the
expert weights are split over the expert axes (E / S local experts each) and their hidden width
over the ``expert_mlp`` axes (tensor parallel: partial outputs summed with ``psum``); other
splits (``embed`` over fsdp) are gathered on entry. Per device, with n local tokens and K
assignments each:

1. every assignment is given a slot in a send buffer [S, C, D], one block of C rows per expert
   shard (destination ``expert // (E / S)``), in token order; padding / dropped assignments
   (id E) are not sent;
2. ``all_to_all`` over the expert axes: block s goes to shard s, which receives [S, C, D] (the
   rows every shard sent it) plus their local expert ids;
3. the local experts run on the received rows through the ``experts`` op (`kernels/moe`: sort
   by local expert, ``ragged_dot``), C * S rows with K = 1;
4. a second ``all_to_all`` returns each row to its slot, and each token combines its K outputs
   with its router weights.

C, the rows per destination, is static and never drops: a token sends at most min(K, E/S) of
its assignments to one shard, so C = n * min(K, E/S); with a capacity of ``capacity``
assignments per expert per row (``capacity_factor`` > 0), C = min(that, (E/S) * rows *
min(capacity, T)).
Memory per device: the send and receive buffers, 2 * S * C * D activations each way (dropless:
up to S times the n * K * D of a local dispatch, the price of not knowing the traffic ahead;
``jax.lax.ragged_all_to_all`` would move only the real rows but is not implemented on XLA:CPU
in jax 0.12). Communication: each all_to_all moves (S - 1) / S of the buffer off-device.
Without an active mesh (or with ``impl="dense"``, the oracle, left to XLA's partitioner) the
``experts`` op runs on all tokens at once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tessera.kernels.moe import experts
from tessera.kernels.moe.reference import rank_in_group
from tessera.sharding.context import active
from tessera.sharding.rules import logical_to_spec


def expert_axes(rules: dict, sizes: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the ``experts`` logical axis splits over."""
    return tuple(a for a in rules.get("experts", ()) if sizes.get(a, 1) > 1)


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def send_rows(tokens: int, rows: int, length: int, k: int, local: int, capacity: int) -> int:
    """Rows C of the buffer each device sends to each expert shard (module docstring)."""
    per_dest = tokens * min(k, local)
    if capacity:
        per_dest = min(per_dest, local * rows * min(capacity, length))
    return per_dest


def _exchange(
    x: jax.Array,
    ids: jax.Array,
    weights: jax.Array,
    wi_gate: jax.Array,
    wi_up: jax.Array,
    wo: jax.Array,
    *,
    axes: tuple[str, ...],
    shards: int,
    num_experts: int,
    capacity: int,
    impl: str,
) -> jax.Array:
    """One device's part: x [b, t, D], ids / weights [b, t, K], local expert weights."""
    b, t, d = x.shape
    k = ids.shape[-1]
    n = b * t
    xf, flat_ids = x.reshape(n, d), ids.reshape(n * k)
    local = num_experts // shards
    if shards == 1:
        return experts(xf, ids.reshape(n, k), weights.reshape(n, k), wi_gate, wi_up, wo, impl=impl)
    rows = send_rows(n, b, t, k, local, capacity)
    dest = jnp.minimum(flat_ids // local, shards)  # shards: not sent
    _, rank = rank_in_group(dest)
    sent = (dest < shards) & (rank < rows)
    slot = jnp.where(sent, dest * rows + rank, shards * rows)
    buffer = shards * rows
    send_x = jnp.zeros((buffer, d), x.dtype).at[slot].set(xf[jnp.arange(n * k) // k], mode="drop")
    local_ids = jnp.where(sent, flat_ids - dest * local, local)
    send_ids = jnp.full((buffer,), local, jnp.int32).at[slot].set(local_ids, mode="drop")
    axis = axes if len(axes) > 1 else axes[0]
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True)
    recv_ids = jax.lax.all_to_all(send_ids, axis, 0, 0, tiled=True)
    ones = jnp.ones((buffer, 1), jnp.float32)
    out = experts(recv_x, recv_ids[:, None], ones, wi_gate, wi_up, wo, impl=impl)
    back = jax.lax.all_to_all(out, axis, 0, 0, tiled=True)
    got = jnp.where(sent[:, None], back[jnp.minimum(slot, buffer - 1)], 0).reshape(n, k, d)
    y = jnp.einsum("nkd,nk->nd", got.astype(jnp.float32), weights.reshape(n, k).astype(jnp.float32))
    return y.astype(x.dtype)


def dispatch(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    wi_gate: jax.Array,
    wi_up: jax.Array,
    wo: jax.Array,
    *,
    capacity: int = 0,
    impl: str = "auto",
) -> jax.Array:
    """x [B, T, D], expert_ids int32 [B, T, K] (E: no expert), weights [B, T, K] -> [B, T, D]:
    ``kernels.moe.experts`` over the active mesh (module docstring). ``capacity``: the most
    assignments an expert takes from one row (0: dropless); it only sizes the exchange, the
    ids must already respect it."""
    b, t, d = x.shape
    k = expert_ids.shape[-1]
    ctx = active()
    if ctx is None or impl == "dense":
        flat = experts(
            x.reshape(b * t, d), expert_ids.reshape(b * t, k), weights.reshape(b * t, k),
            wi_gate, wi_up, wo, impl=impl,
        )
        return flat.reshape(b, t, d)
    mesh, rules = ctx
    sizes = dict(mesh.shape)
    num_experts, _, hidden = wi_gate.shape
    axes = expert_axes(rules, sizes)
    shards = math.prod(sizes[a] for a in axes)
    if num_experts % shards:
        raise ValueError(
            f"model.moe.num_experts={num_experts} is not divisible by the mesh's expert axes "
            f"{'x'.join(axes)} = {shards}"
        )
    token_spec = logical_to_spec(("batch", "length", None), rules, sizes, x.shape)
    taken = set(axes)
    for entry in token_spec:
        taken.update((entry,) if isinstance(entry, str) else entry or ())
    tensor = tuple(
        a for a in rules.get("expert_mlp", ()) if sizes.get(a, 1) > 1 and a not in taken
    )
    if hidden % math.prod(sizes[a] for a in tensor):
        tensor = ()
    ep, tp = _entry(axes), _entry(tensor)
    assign_spec = PartitionSpec(token_spec[0], token_spec[1], None)

    def per_shard(x, ids, w, wg, wu, wo_):
        y = _exchange(
            x, ids, w, wg, wu, wo_, axes=axes, shards=shards, num_experts=num_experts,
            capacity=capacity, impl=impl,
        )
        y = y.reshape(x.shape)
        return jax.lax.psum(y, tensor) if tensor else y

    mapped = jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(
            token_spec, assign_spec, assign_spec,
            PartitionSpec(ep, None, tp), PartitionSpec(ep, None, tp), PartitionSpec(ep, tp, None),
        ),
        out_specs=token_spec,
        check_vma=False,
    )
    return mapped(x, expert_ids, weights, wi_gate, wi_up, wo)
