"""Golden file for the delta_rule kernel: fla's naive DPLR recurrence on small RWKV-7-like inputs.

Runs flash-linear-attention's plain torch ``fla.ops.generalized_delta_rule.dplr.naive.
dplr_recurrence`` (no triton needed), never the tests: ``tests/kernels/test_delta_rule.py`` reads
what this writes, ``tests/fixtures/fla/delta_rule.npz`` (a few KB):

  r, w, k, a, b  float32 [B, T, H, K]   tessera's layout (fla's naive takes [B, H, T, K])
  v              float32 [B, T, H, V]
  h0             float32 [B, H, K, V]   initial state (same layout in both)
  o              float32 [B, T, H, V]   fla's output (its q is scaled by K^-1/2: scale = K**-0.5)
  state          float32 [B, H, K, V]   fla's final state

Inputs follow RWKV-7: w = -exp(-1/2) * sigmoid(.), a = -kk, b = kk * iclr with kk unit-norm per
head. Set up the side virtualenv of ``tools/make_golden.py`` plus
``pip install flash-linear-attention==0.6.0 einops``, then
``/tmp/hfvenv/bin/python tools/make_fla_delta_golden.py``.
The seed is fixed, so a rerun with the same versions writes the same numbers.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "fla" / "delta_rule.npz"
B, T, H, K, V = 2, 9, 2, 6, 5


def main() -> None:
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    r, k, v = normal(B, T, H, K), normal(B, T, H, K), normal(B, T, H, V)
    w = (-np.exp(-0.5) * sigmoid(2.0 * normal(B, T, H, K))).astype(np.float32)
    kk = normal(B, T, H, K)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = sigmoid(normal(B, T, H, K)).astype(np.float32)
    a, b = -kk, kk * iclr
    h0 = normal(B, H, K, V)
    heads_first = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))  # noqa: E731
    o, state = dplr_recurrence(
        *(heads_first(x) for x in (r, k, v, a, b, w)), initial_state=torch.from_numpy(h0)
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        **dict(r=r, w=w, k=k, v=v, a=a, b=b, h0=h0),
        o=o.numpy().transpose(0, 2, 1, 3),
        state=state.numpy(),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
