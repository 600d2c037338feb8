"""The routed experts of an MoE layer behind one dispatch:
``experts(x, expert_ids, weights, wi_gate, wi_up, wo, impl=...)`` (shapes in `reference`).

impls, in the order auto tries them (`OP`, a `tessera.kernels.registry.Op`):
  megablox  TPU (d_model and expert_dim multiples of 128): the same dispatch with jax's Pallas
          grouped matmul (``megablox.gmm``) for the three expert matmuls (``megablox.py``); it
          visits only the row tiles that hold assignments. Auto's pick on TPU, as in MaxText:
          XLA's own ``ragged_dot`` fails to compile Mixtral-8x7B's experts on v6e (out of
          scoped VMEM in its output fusion; README, Big presets on pods). The kernel's cost
          estimate counts all rows of its static buffer, as XLA counts ``ragged_dot``.
  ragged  dropless: assignments sorted by expert, ``jax.lax.ragged_dot`` grouped matmuls with the
          group sizes, unsorted, combined. Auto's pick off TPU, and on TPU where megablox
          declines (widths not multiples of 128; bf16 under a global "highest" precision).
          (XLA:CPU lowers ragged_dot to a masked dense dot over all groups, and XLA's cost
          analysis counts it that way on TPU too.)
  dense   every expert on every token, zero weight where not selected: the oracle. Only when
          named.
Another grouped-matmul kernel (tokamax) joins with ``OP.register(impl, before="ragged")`` and no
model change. Expert parallelism (`parallel.py`) calls this op on each shard's received
rows.
"""

from __future__ import annotations

import jax

from tessera.kernels.moe import megablox, reference
from tessera.kernels.registry import Impl, Op, impls_getattr

__all__ = ["IMPLS", "OP", "experts"]

OP = Op(
    "moe",
    [
        Impl("megablox", megablox.experts, supports=megablox.supports),
        Impl("ragged", reference.ragged),
        Impl("dense", reference.dense, auto=False),
    ],
)

__getattr__ = impls_getattr(OP)  # IMPLS = ("auto", *OP.names)


def experts(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    wi_gate: jax.Array,
    wi_up: jax.Array,
    wo: jax.Array,
    *,
    impl: str = "auto",
) -> jax.Array:
    """x [N, D], expert_ids int32 [N, K] (>= E: no expert), weights [N, K], wi_gate / wi_up
    [E, D, F], wo [E, F, D] -> [N, D] in x.dtype: sum_k weights * FFN_{expert_ids}(x)."""
    return OP(x, expert_ids, weights, wi_gate, wi_up, wo, impl=impl)
