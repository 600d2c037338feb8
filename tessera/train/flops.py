"""Analytic FLOP counters (per family mixer) and peak FLOP/s per device kind, for MFU.

Counts are matmul FLOPs as executed (2 per multiply-add), attention scores over the full T x T
block (what XLA's dense attention computes); training = 3 x forward (forward + two backward
matmuls).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from tessera.configs.base import ConfigDict


def attention_flops(m: ConfigDict, seq_len: int) -> float:
    """Per token: q/k/v/o projections plus scores and weighted values over ``seq_len`` keys."""
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    proj = 2 * m.d_model * (q + 2 * kv) + 2 * q * m.d_model
    # Dense attention computes the whole T x T block, also under a causal or window mask.
    return proj + 2 * 2 * seq_len * q


def mlp_flops(m: ConfigDict, seq_len: int) -> float:
    del seq_len
    return 2 * 3 * m.d_model * m.mlp_dim


def mamba2_flops(m: ConfigDict, seq_len: int) -> float:
    """Per token: in/out projections, the depthwise conv, and the chunked SSD: within a chunk of
    L = min(chunk_size, seq_len) tokens the C.B scores and the weighted sum of values over the
    whole L x L block (as executed), plus writing the chunk state and reading the incoming one."""
    s = m.ssm
    d_inner = s.expand * m.d_model
    gn = s.num_groups * s.state_dim
    heads = d_inner // s.head_dim
    proj = 2 * m.d_model * (2 * d_inner + 2 * gn + heads) + 2 * d_inner * m.d_model
    conv = 2 * s.conv_width * (d_inner + 2 * gn)
    chunk = min(s.chunk_size, seq_len)
    return proj + conv + 2 * chunk * (gn + d_inner) + 2 * 2 * d_inner * s.state_dim


def mamba_flops(m: ConfigDict, seq_len: int) -> float:
    """Per token: in/x/dt/out projections, the depthwise conv, and the selective scan's
    elementwise work per (d_inner x N) state element: exp(dt A) (2), dt x B (1), the state
    update (2) and the C readout (2). Independent of ``seq_len`` (a recurrence)."""
    from tessera.layers.mixers.mamba import mamba_dims

    del seq_len
    di, n, k, r = mamba_dims(m)
    proj = 2 * m.d_model * 2 * di + 2 * di * (r + 2 * n) + 2 * r * di + 2 * di * m.d_model
    return proj + 2 * k * di + 7 * di * n


SEQUENCE_MIXER_FLOPS: dict[str, Callable[[ConfigDict, int], float]] = {
    "attention": attention_flops,
    "mamba": mamba_flops,
    "mamba2": mamba2_flops,
}
CHANNEL_MIXER_FLOPS: dict[str, Callable[[ConfigDict, int], float]] = {
    "mlp": mlp_flops,
    "none": lambda m, s: 0.0,
}


def forward_flops_per_token(m: ConfigDict, seq_len: int) -> float:
    """Forward FLOPs per token of an LM (``config.model``) at training length ``seq_len``."""
    from tessera.models.lm import parse_pattern

    pattern = parse_pattern(m)
    repeats = m.num_layers // len(pattern)
    per_unit = sum(
        SEQUENCE_MIXER_FLOPS[mx](m, seq_len) + CHANNEL_MIXER_FLOPS[ch](m, seq_len)
        for mx, ch in pattern
    )
    return repeats * per_unit + 2 * m.d_model * m.vocab_size


def train_flops_per_step(config: ConfigDict) -> float:
    """FLOPs of one optimizer step (all devices): 3 x forward over the global batch."""
    tokens = config.data.global_batch_size * config.data.seq_len
    return 3.0 * forward_flops_per_token(config.model, config.data.seq_len) * tokens


# Dense bf16 peak FLOP/s per chip, by the prefix of jax's ``device_kind``.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


@functools.cache
def cpu_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul on this host, measured once (best of ``repeats``)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for ``device`` (default: the first device)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        # Host devices share the cores: the measured peak is split between them.
        return cpu_matmul_peak() / jax.device_count(), "cpu matmul probe"
    for prefix, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device.device_kind.startswith(prefix):
            return peak, f"table: {prefix}"
    return float("nan"), f"unknown device kind {device.device_kind!r}"
