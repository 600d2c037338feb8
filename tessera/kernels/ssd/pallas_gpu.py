"""Mamba-2's SSD through the Pallas GPU (Triton) GLA kernels: `tessera.kernels.ssd.via_gla` over
`tessera.kernels.gla.pallas_gpu.gla` (scalar decay per head: q = C, k = B, v = dt x, g = dt A).
The kernel's layout, grid, algorithm and TF32 rule are in `tessera.kernels.gla.pallas_gpu`.
"""

from __future__ import annotations

import jax

from tessera.kernels.gla import pallas_gpu as gla_gpu
from tessera.kernels.platform import kernel_platform_reason, tf32_reason
from tessera.kernels.ssd.via_gla import via_gla

ssd = via_gla(gla_gpu.gla)


def supports(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
             D: jax.Array, **_) -> str | None:
    """None when the GLA GPU kernel runs this SSD call, else why not."""
    reason = kernel_platform_reason("gpu")
    if reason is not None:
        return reason
    for name, a in (("x", x), ("B", B), ("C", C)):
        if a.dtype not in gla_gpu.DTYPES:
            return f"{name} dtype {a.dtype} (float32 / bfloat16 / float16)"
    if B.shape[-1] > gla_gpu.MAX_HEAD_DIM or x.shape[-1] > gla_gpu.MAX_HEAD_DIM:
        return (f"state dim {B.shape[-1]} / head dim {x.shape[-1]} (the kernel takes up to "
                f"{gla_gpu.MAX_HEAD_DIM})")
    return None


def auto_skips(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
               *args, **kwargs) -> str | None:
    """Why auto passes the kernel over: one token (the decode step), or float32 inputs when
    full-precision dots were asked for (the kernel's dots run at TF32)."""
    if x.shape[1] == 1:
        return f"T = {x.shape[1]} (the decode step: the sequential form)"
    return tf32_reason(x)
