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
from tessera.kernels.platform import full_f32_matmuls, interpret, kernel_platform_reason

TILE = 128  # the smallest tile (the MXU's width): d_model and expert_dim must be multiples
ROW_TILE = 512  # rows per tile, fewer when there are fewer rows
WIDTH_TILE = 512  # the widest contraction / output tile


def _width_tile(width: int) -> int:
    return max(t for t in range(TILE, WIDTH_TILE + 1, TILE) if width % t == 0)


def tiling(rows: int, k: int, n: int) -> tuple[int, int, int]:
    """(row, contraction, output) tile of a grouped matmul of ``rows`` (padded) rows, ``k``
    input and ``n`` output features; the kernel and its backward look their tiles up here for
    each of their calls. The kernel reads every row tile once per output tile and the weights
    once per row tile (its cost estimate counts them so), so bigger tiles read less: 128-wide
    tiles made Mixtral-8x7B's experts 3x slower than ``ragged_dot`` in XLA's cost model. Widths
    take the largest multiple of 128 up to 512 that divides them (Qwen3's 768: 384). With
    1024-wide tiles the weight gradient's kernel (``tgmm``) ran out of v5p's scoped VMEM for
    Mixtral-8x7B; 512 x 512 tiles take about 6 MiB with double buffering."""
    return min(ROW_TILE, rows), _width_tile(k), _width_tile(n)


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
    if x.dtype != jnp.float32 and full_f32_matmuls():
        # The kernel's dots take the global precision; Mosaic rejects a bf16 dot at HIGHEST
        # ("Bad lhs type", jax 0.12), and the kernel has no precision argument to override it.
        return (f"{x.dtype} operands with jax_default_matmul_precision="
                f"{jax.config.jax_default_matmul_precision!r}: Mosaic's dot rejects them")
    return None


def grouped_ffn(xs: jax.Array, group_sizes: jax.Array, wi_gate: jax.Array, wi_up: jax.Array,
                wo: jax.Array) -> jax.Array:
    """``reference.grouped_ffn`` with the Pallas grouped matmul."""
    m = xs.shape[0]
    pad = -m % min(ROW_TILE, -(-m // TILE) * TILE)  # to a whole number of row tiles
    valid = jnp.arange(m + pad) < jnp.sum(group_sizes)
    xs = jnp.where(valid[:, None], jnp.pad(xs, ((0, pad), (0, 0))), 0)
    gmm = _gmm()
    out_type = xs.dtype

    def dot(a: jax.Array, w: jax.Array) -> jax.Array:
        y = gmm(a, w, group_sizes, jnp.float32, tiling, None, None, False, interpret())
        return jnp.where(valid[:, None], y, 0).astype(out_type)

    h = jax.nn.silu(dot(xs, wi_gate)) * dot(xs, wi_up)
    return dot(h, wo)[:m]


def experts(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, wi_gate: jax.Array,
            wi_up: jax.Array, wo: jax.Array) -> jax.Array:
    """``reference.ragged``'s dispatch with ``grouped_ffn`` above."""
    return reference.ragged(x, expert_ids, weights, wi_gate, wi_up, wo, ffn=grouped_ffn)
