"""The cached-decode check every sequence family runs: feeding a sequence through the cache in
pieces gives the logits of one uncached forward pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def check_cached_decode(apply: Callable, params, tokens, full, cache, pieces: Sequence[int],
                        tol: dict):
    """Feed ``tokens`` [B, T] as ``pieces`` (prefill / chunk sizes), then one token at a time;
    every call's logits must equal ``full`` [B, T, V] at the same positions and the cache's
    ``lengths`` must follow. Returns the final cache."""
    batch, length = tokens.shape
    start = 0
    for size in [*pieces, *[1] * (length - sum(pieces))]:
        out = apply(params, tokens[:, start : start + size], cache=cache)
        np.testing.assert_allclose(out.logits, full[:, start : start + size], **tol,
                                   err_msg=f"tokens {start}:{start + size}")
        cache, start = out.cache, start + size
        np.testing.assert_array_equal(cache["lengths"], [start] * batch)
    return cache
