"""The recurrent mixers' shared helpers (token shift, causal conv windows, the state a call
leaves) and the stack's two contracts for them: stateful channel mixers (their cache rides in
the block's cache) and cross-layer streams (a value the first layer sets and later layers read),
exercised with two toy mixers registered for the test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.layers import mixers
from tessera.layers.base import cast, param
from tessera.layers.mixers import SeqInfo
from tessera.layers.mixers.recurrent import (
    causal_conv,
    document_starts,
    history,
    tail,
    token_shift,
    tokens_since_start,
)
from tessera.models.create import ModelSpec
from tests.cached_decode import check_cached_decode


def info(positions, segments):
    return SeqInfo(jnp.asarray(positions, jnp.int32), jnp.asarray(segments, jnp.int32))


def test_token_shift_packed_rows_and_padding():
    x = jnp.arange(1.0, 8.0)[None, :, None] * jnp.ones((1, 1, 2))
    # two documents (positions restart, segment changes) then padding
    i = info([[0, 1, 2, 0, 1, 0, 0]], [[1, 1, 1, 2, 2, 0, 0]])
    shifted, last = token_shift(x, i, None, cached=False)
    np.testing.assert_array_equal(shifted[0, :5, 0], [0, 1, 2, 0, 4])
    np.testing.assert_array_equal(last[0], [5, 5])  # the last real token
    starts = document_starts(i, cached=False)
    np.testing.assert_array_equal(starts[0], [1, 0, 0, 1, 0, 0, 0])
    # a segment change without a position reset also starts a document
    j = info([[0, 1, 2, 3]], [[1, 1, 2, 2]])
    np.testing.assert_array_equal(tokens_since_start(j, cached=False)[0], [0, 1, 0, 1])


def test_token_shift_cached_pieces_equal_one_pass():
    x = jax.random.normal(jax.random.key(0), (2, 6, 3))
    full, _ = token_shift(x, info([list(range(6))] * 2, [[1] * 6] * 2), None, cached=False)
    prev = jnp.zeros((2, 3))
    outs = []
    for a, b in ((0, 4), (4, 5), (5, 6)):
        pos = jnp.broadcast_to(jnp.arange(a, b), (2, b - a))
        piece, prev = token_shift(x[:, a:b], info(pos, jnp.ones_like(pos)), prev, cached=True)
        outs.append(piece)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full)
    np.testing.assert_allclose(prev, x[:, -1])
    # a right-padded row stops at its last real token; a row of padding keeps its state
    seg = jnp.asarray([[1, 1, 0], [0, 0, 0]])
    _, kept = token_shift(x[:, :3], info([[6, 7, 8], [6, 7, 8]], seg), prev, cached=True)
    np.testing.assert_allclose(kept, jnp.stack([x[0, 1], prev[1]]))


def test_causal_conv_and_tail_in_pieces():
    k, c = 4, 3
    x = jax.random.normal(jax.random.key(1), (1, 9, c))
    w = jax.random.normal(jax.random.key(2), (k, c))
    whole = causal_conv(history(x, None, k), jnp.arange(9)[None], w)
    ref = sum(jnp.pad(x, ((0, 0), (k - 1 - i, 0), (0, 0)))[:, :9] * w[i] for i in range(k))
    np.testing.assert_allclose(whole, ref, rtol=1e-6, atol=1e-6)
    prev, outs = jnp.zeros((1, k - 1, c)), []
    for a, b in ((0, 2), (2, 7), (7, 9)):
        hist = history(x[:, a:b], prev, k)
        since = jnp.arange(a, b)[None]
        outs.append(causal_conv(hist, since, w))
        prev = tail(hist, since, jnp.ones((1, b - a), bool), prev, k - 1)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), whole, rtol=1e-6, atol=1e-6)


# -- toy mixers for the stack's contracts --------------------------------------------------------


class ShiftChannel(nnx.Module):
    """A stateful channel mixer: y = w * x[t-1] (token shift kept in the cache)."""

    def __init__(self, cfg, *, rngs):
        self.w = param(rngs, lambda k, s, d: jnp.full(s, 0.5, d), (cfg.d_model,), ("embed",),
                       cfg.param_dtype)

    def __call__(self, x, info, cache):
        prev = None if cache is None else cache["shift"]
        shifted, last = token_shift(x, info, prev, cached=cache is not None)
        y = shifted * cast(self.w, x.dtype)
        return y, {}, (None if cache is None else {"shift": last.astype(cache["shift"].dtype)})

    @staticmethod
    def init_cache(cfg, batch, length, dtype):
        return {"shift": jnp.zeros((batch, cfg.d_model), dtype)}

    @staticmethod
    def cache_axes():
        return {"shift": ("cache_batch", "embed")}

    @staticmethod
    def flops_per_token(cfg, seq_len):
        return 2.0 * cfg.d_model


class FirstValue(nnx.Module):
    """A sequence mixer reading a cross-layer stream: the first layer stores its input as
    ``v_first``; later ones add ``u * v_first``. Stateless (no per-token cache)."""

    STREAMS = ("v_first",)

    def __init__(self, cfg, *, rngs):
        self.u = param(rngs, lambda k, s, d: jnp.full(s, 0.25, d), (cfg.d_model,), ("embed",),
                       cfg.param_dtype)

    def __call__(self, x, info, cache, streams):
        if "v_first" not in streams:
            return jnp.tanh(x), cache, {}, {**streams, "v_first": x}
        return jnp.tanh(x) + cast(self.u, x.dtype) * streams["v_first"], cache, {}, streams

    @staticmethod
    def init_cache(cfg, batch, length, dtype):
        return {}

    @staticmethod
    def cache_axes():
        return {}

    @staticmethod
    def flops_per_token(cfg, seq_len):
        return 4.0 * cfg.d_model


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(mixers.SEQUENCE_MIXERS, "first_value", FirstValue)
    monkeypatch.setitem(mixers.CHANNEL_MIXERS, "shift", ShiftChannel)


def toy_model(overrides, scan=True):
    cfg = load_config(f"llama:tiny,model.dtype=float32,model.num_layers=3,{overrides}").model
    cfg.scan_layers = scan
    spec = ModelSpec(cfg)
    params = jax.tree.map(
        lambda s: jax.random.normal(jax.random.key(3), s.shape, s.dtype) * 0.3, spec.shapes
    )

    @jax.jit
    def apply(params, tokens, cache=None):
        return spec.merge(params)(tokens, cache=cache)

    return spec, params, apply


def unstack_units(params):
    """Scanned parameters (``units`` stacked over repeats) in the unrolled layout."""
    units = params["units"]
    repeats = jax.tree.leaves(units)[0].shape[0]
    return {**params, "units": {r: jax.tree.map(lambda a, r=r: a[r], units)
                                for r in range(repeats)}}


def test_stateful_channel_mixer_cached_decode(toys):
    spec, params, apply = toy_model("model.pattern=('attention:shift',)")
    model = spec.merge(params)
    cache = model.init_cache(2, 8)
    _, channel_cache = cache["layers"][0]
    assert channel_cache["shift"].shape == (3, 2, model.cfg.d_model)  # stacked over layers
    axes = model.cache_axes()["layers"][0]
    assert axes[1]["shift"] == ("layers", "cache_batch", "embed")
    tokens = jax.random.randint(jax.random.key(4), (2, 7), 0, model.cfg.vocab_size)
    full = apply(params, tokens).logits
    check_cached_decode(apply, params, tokens, full, cache, [3], dict(rtol=1e-5, atol=1e-5))


def test_streams_reach_later_layers_scanned_and_unrolled(toys):
    layout = "model.prefix=('first_value:mlp',),model.pattern=('first_value:mlp',)"
    _, params, apply = toy_model(layout)
    tokens = jax.random.randint(jax.random.key(5), (2, 5), 0, 64)
    scanned = apply(params, tokens).logits
    unrolled_spec, _, unrolled_apply = toy_model(layout, scan=False)
    unrolled_params = unstack_units(params)
    assert jax.tree.structure(unrolled_params) == jax.tree.structure(unrolled_spec.shapes)
    np.testing.assert_allclose(unrolled_apply(unrolled_params, tokens).logits, scanned,
                               rtol=1e-5, atol=1e-5)
    # the stream matters: zeroing the scanned layers' u changes the output
    zeroed = {**params, "units": jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if p[-1].key == "u" else a, params["units"])}
    assert not np.allclose(apply(zeroed, tokens).logits, scanned, atol=1e-4)


def test_stream_read_by_the_scan_must_be_set_by_a_prefix(toys):
    spec, params, apply = toy_model("model.pattern=('first_value:mlp',)")
    with pytest.raises(ValueError, match="put the first layer in model.prefix"):
        apply(params, jnp.zeros((1, 3), jnp.int32))
