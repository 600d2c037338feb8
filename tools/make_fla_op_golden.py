"""Golden outputs of flash-linear-attention's (fla) naive torch references for tessera's ops.

Runs fla's pure-torch reference functions (never its triton kernels, so a CPU is enough) on tiny
seeded inputs and writes ``tests/fixtures/fla/gla_golden.npz``, which tests/kernels/test_gla.py
reads (the tests need no torch). Arrays are float32 in tessera's [B, T, H, D] layout (fla's
functions take [B, H, T, D]; the transposes are done here):

  rwkv6_q, rwkv6_k [B, T, H, K], rwkv6_v [B, T, H, V], rwkv6_w [B, T, H, K] (log decay < 0),
  rwkv6_u [H, K], rwkv6_h0 [B, H, K, V], rwkv6_scale [] ->
  rwkv6_o [B, T, H, V], rwkv6_ht [B, H, K, V]
      fla.ops.rwkv6.recurrent_naive.naive_recurrent_rwkv6(..., output_final_state=True)
  retention_q, retention_k [B, T, H, D], retention_v [B, T, H, D] -> retention_o [B, T, H, D]
      fla.ops.retention.naive.naive_retention (decay 1 - 2^(-5 - h) for head h, scale D^-0.5)

Run with the side virtualenv that has fla and torch (see tools/make_golden.py for its setup,
plus ``pip install flash-linear-attention``):

  /tmp/hfvenv/bin/python tools/make_fla_op_golden.py

Seeds are fixed, so a rerun with the same versions writes the same arrays.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from fla.ops.retention.naive import naive_retention
from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "fla" / "gla_golden.npz"


def _bthd(x: torch.Tensor) -> np.ndarray:
    """fla's [B, H, T, D] -> tessera's [B, T, H, D], float32."""
    return x.transpose(1, 2).float().numpy()


def rwkv6(gen: torch.Generator) -> dict[str, np.ndarray]:
    b, h, t, dk, dv = 2, 2, 11, 4, 3
    q, k = (torch.randn(b, h, t, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=gen)
    w = -torch.exp(torch.randn(b, h, t, dk, generator=gen))  # log decay, as RWKV-6's -exp(w)
    u = torch.randn(h, dk, generator=gen)
    h0 = torch.randn(b, h, dk, dv, generator=gen)
    scale = 0.7
    o, ht = naive_recurrent_rwkv6(
        q, k, v, w, u, scale=scale, initial_state=h0, output_final_state=True
    )
    return {
        "rwkv6_q": _bthd(q), "rwkv6_k": _bthd(k), "rwkv6_v": _bthd(v), "rwkv6_w": _bthd(w),
        "rwkv6_u": u.numpy(), "rwkv6_h0": h0.numpy(), "rwkv6_scale": np.float32(scale),
        "rwkv6_o": _bthd(o), "rwkv6_ht": ht.numpy(),
    }


def retention(gen: torch.Generator) -> dict[str, np.ndarray]:
    b, h, t, d = 2, 3, 13, 4
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
    o = naive_retention(q, k, v)
    return {
        "retention_q": _bthd(q), "retention_k": _bthd(k), "retention_v": _bthd(v),
        "retention_o": _bthd(o),
    }


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    arrays = rwkv6(gen) | retention(gen)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
