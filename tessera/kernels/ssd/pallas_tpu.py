"""SSD on the Pallas TPU GLA kernels (`tessera.kernels.gla.pallas_tpu`, scalar decay).

The mapping is `via_gla`'s (q = C, k = B, v = dt x, g = dt A, S = h^T, plus the skip D x). With
one group (G = 1, Mamba-2's usual) B and C reach the kernels as they are, one head for all:
every head block reads the same [L, N] blocks and the backward sums each block's heads' dB,
dC in VMEM (the repeat to H heads, its HBM copies and their gradients' reduction are never
built). With G > 1 groups B and C are repeated to heads as `via_gla` does.
"""

from __future__ import annotations

import functools

import jax

from tessera.kernels.gla import pallas_tpu as gla_kernel
from tessera.kernels.platform import kernel_platform_reason
from tessera.kernels.ssd.reference import check_inputs
from tessera.kernels.ssd.via_gla import from_gla, gla_values, via_gla
from tessera.sharding.kernels import shard_map_kernel


def supports(x: jax.Array, *args, **kw) -> str | None:
    """None on TPU (or in interpret mode), else why not: the GLA kernel takes any SSD shape."""
    return kernel_platform_reason("tpu")


def ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    *,
    h0: jax.Array | None = None,
    reset: jax.Array | None = None,
    chunk_size: int | None = None,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`tessera.kernels.ssd.ssd` (shapes there) on the Pallas TPU kernels, per device under
    ``shard_map`` over batch and heads. ``chunk`` is the kernel's chunk (default
    `gla_kernel.CHUNKS`); ``chunk_size`` (the chunked XLA form's) is ignored."""
    del chunk_size
    if B.ndim == 4 and B.shape[2] != 1:
        return via_gla(functools.partial(gla_kernel.gla, chunk=chunk))(
            x, dt, A, B, C, D, h0=h0, reset=reset)
    check_inputs(x, dt, A, B, C, D, h0, reset)
    n = gla_kernel.chunk_length(dt, chunk)
    if n < 1 or n % gla_kernel.SUBLANES:
        raise ValueError(f"ssd pallas_tpu: chunk must be a multiple of 8, got {n}")
    v, g, h0 = gla_values(x, dt, A, h0)
    tok = ("batch", None, "act_heads", None)
    shared = ("batch", None, None, None)  # the one group: whole on every device
    run = shard_map_kernel(
        functools.partial(gla_kernel._per_shard, scale=1.0, n=n),
        in_axes=(shared, shared, tok, tok[:3], ("act_heads", None),
                 ("batch", "act_heads", None, None), ("batch", None)),
        out_axes=(tok, ("batch", "act_heads", None, None)),
    )
    return from_gla(*run(C, B, v, g, None, h0, reset), x, D)
