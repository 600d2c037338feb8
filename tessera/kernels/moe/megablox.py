"""The routed experts through jax's Pallas TPU grouped matmul (``megablox.gmm``, with its
custom VJP: ``tgmm`` for the weight gradients), in place of ``jax.lax.ragged_dot``.

XLA lowers ``ragged_dot`` to a masked dense dot over every group on CPU, and its TPU cost model
counts it the same way (E times the active FLOPs); the grouped-matmul kernel visits only each
group's row tiles. Same dispatch as ``reference.ragged`` (sort by expert, unsort, combine); only
the three grouped matmuls differ. Rows are padded to a multiple of the row tile, and rows past
the last group (padding, no-expert assignments) are zeroed on the way in so that the kernel's
unspecified values there never reach a gradient.

Runs on TPU, and anywhere in Pallas interpret mode (`tessera.kernels.platform.interpreting`: the
tests' CPU check).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tessera.kernels.moe import reference
from tessera.kernels.platform import interpret, kernel_platform_reason

TILE = 128  # row / contraction / output tile of the kernel (the MXU's width)


def _gmm():
    from jax.experimental.pallas.ops.tpu.megablox import ops  # libtpu-independent import

    return ops.gmm


def supports(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, wi_gate: jax.Array,
             wi_up: jax.Array, wo: jax.Array) -> str | None:
    """None when the kernel can run these inputs, else why not (static facts only)."""
    reason = kernel_platform_reason("tpu")
    if reason is not None:
        return reason
    d, f = wi_gate.shape[1], wi_gate.shape[2]
    if d % TILE or f % TILE:
        return f"d_model {d} and expert_dim {f} must be multiples of {TILE}"
    return None


def grouped_ffn(xs: jax.Array, group_sizes: jax.Array, wi_gate: jax.Array, wi_up: jax.Array,
                wo: jax.Array) -> jax.Array:
    """``reference.grouped_ffn`` with the Pallas grouped matmul."""
    m = xs.shape[0]
    pad = -m % TILE
    valid = jnp.arange(m + pad) < jnp.sum(group_sizes)
    xs = jnp.where(valid[:, None], jnp.pad(xs, ((0, pad), (0, 0))), 0)
    gmm = _gmm()
    out_type = xs.dtype

    def dot(a: jax.Array, w: jax.Array) -> jax.Array:
        y = gmm(a, w, group_sizes, jnp.float32, (TILE, TILE, TILE), None, None, False, interpret())
        return jnp.where(valid[:, None], y, 0).astype(out_type)

    h = jax.nn.silu(dot(xs, wi_gate)) * dot(xs, wi_up)
    return dot(h, wo)[:m]


def experts(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, wi_gate: jax.Array,
            wi_up: jax.Array, wo: jax.Array) -> jax.Array:
    """``reference.ragged``'s dispatch with ``grouped_ffn`` above."""
    return reference.ragged(x, expert_ids, weights, wi_gate, wi_up, wo, ffn=grouped_ffn)
