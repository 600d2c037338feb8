"""What every sequence family's tests share: a tiny LM with realistic random parameters and one
jitted apply (``build_lm``), random tokens, and the cached-decode check (feeding a sequence
through the cache in pieces gives the logits of one uncached forward pass)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tessera.configs import load_config
from tessera.models.create import ModelSpec


def params_by_leaf(spec: ModelSpec, leaf_value: Callable, seed: int = 0):
    """Every parameter of ``spec`` drawn on the host by ``leaf_value(rng, name, shape)`` (numpy,
    ``name`` the parameter's last path key), in the parameter's dtype; leaves in tree order."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        return jnp.asarray(leaf_value(rng, path[-1].key, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(one, spec.shapes)


def build_lm(spec_text: str, make_params: Callable, seed: int = 0):
    """(model cfg, params, apply, model) of the config ``spec_text`` with ``make_params(spec,
    seed)``; ``apply(params, tokens, positions=, segment_ids=, cache=)`` is one jitted function,
    so tests sharing a build share its compilations."""
    cfg = load_config(spec_text).model
    spec = ModelSpec(cfg)

    @jax.jit
    def apply(params, tokens, positions=None, segment_ids=None, cache=None):
        model = spec.merge(params)
        return model(tokens, positions=positions, segment_ids=segment_ids, cache=cache)

    params = make_params(spec, seed)
    return cfg, params, apply, spec.merge(params)


def random_tokens(shape, vocab: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


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
