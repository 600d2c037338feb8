"""Memory-bound view of decoding: the host's copy bandwidth, and the bytes one decode step reads.

A decode step of a small model reads every parameter once and the part of the cache filled so
far; ``decode_step_bytes`` counts those bytes from abstract shapes (``ModelSpec.shapes`` and
``Decoder.cache_info``), nothing allocated. Bytes per step x steps/s is the bandwidth a decoder
achieves; ``copy_bandwidth`` is what the host's memory gives a plain copy, its practical roof.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from tessera.serve.engine import Decoder


def copy_bandwidth(
    nbytes: int = 512 * 2**20, repeats: int = 5, threads: int | None = None
) -> float:
    """Bytes/s of copying a ``nbytes`` buffer into another (bytes read + bytes written per
    second), best of ``repeats``; the copy is split over ``threads`` threads (numpy releases
    the GIL while copying). Default: the better of one thread and one per CPU."""
    if nbytes < 1 or repeats < 1:
        raise ValueError(f"nbytes ({nbytes}) and repeats ({repeats}) must be >= 1")
    if threads is None:
        counts = sorted({1, os.cpu_count() or 1})
        return max(copy_bandwidth(nbytes, repeats, t) for t in counts)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    n = max(nbytes // 8, threads)
    src = np.ones(n, np.float64)  # written once, so every page is really mapped
    dst = np.zeros_like(src)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(*p), parts))
            times.append(time.perf_counter() - t0)
    best = min(times[1:])  # the first run only warms up
    if not dst[-1] == 1.0:
        raise RuntimeError("copy_bandwidth: the copy did not happen")
    return 2 * src.nbytes / best


@dataclasses.dataclass
class StepBytes:
    """Bytes one decode step of a batch reads (``state``: read and written)."""

    params: int  # every parameter, but only the batch's rows of an untied input embedding
    kv: float  # the filled part of the per-token cache, averaged over the run's steps
    state: int  # fixed-size per-sequence state (recurrent state, bookkeeping), read + written

    @property
    def total(self) -> float:
        return self.params + self.kv + self.state


def decode_step_bytes(
    decoder: Decoder, batch: int, prompt_len: int, new_tokens: int
) -> StepBytes:
    """Bytes read per decode step of ``batch`` rows, each a ``prompt_len``-token prompt followed
    by ``new_tokens`` generated tokens, from abstract shapes.

    Parameters: all of them, in their stored dtype, except the input embedding when it is not
    tied (``model.embed``): a step gathers only ``batch`` rows of it; tied, the head reads it
    all. Cache: the per-token part (KV caches, ``CacheInfo.token_bytes``) as far as it is filled.
    The first new token comes from prefill; the step making token ``j`` (2..new_tokens) attends
    over ``prompt_len + j - 1`` tokens, ``prompt_len + new_tokens / 2`` on average. The fixed
    per-sequence part (``CacheInfo.state_bytes``) is read and written each step.
    """
    if batch < 1 or prompt_len < 1 or new_tokens < 1:
        raise ValueError(
            f"batch ({batch}), prompt_len ({prompt_len}) and new_tokens ({new_tokens}) must be "
            ">= 1"
        )
    spec = decoder.spec
    nbytes = lambda a: int(a.size) * np.dtype(a.dtype).itemsize
    params = sum(nbytes(a) for a in jax.tree.leaves(spec.shapes))
    embed = spec.shapes.get("embed") if isinstance(spec.shapes, dict) else None
    if embed is not None and not bool(spec.cfg.get("tie_embeddings", False)):
        for table in jax.tree.leaves(embed):
            params -= nbytes(table)
            params += batch * nbytes(table) // int(table.shape[0])
    max_len = decoder.request_shape(batch, prompt_len, new_tokens)["max_len"]
    info = decoder.cache_info(batch, max_len)
    filled = prompt_len + new_tokens / 2
    return StepBytes(
        params=params,
        kv=info.bytes_per_token * batch * filled,
        state=2 * info.state_bytes,
    )
