"""Sampling: which tokens each filter keeps, greedy limits, seeds and per-row keys, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.serve.sampling import SamplingParams, process_logits, sample

# Probabilities in a shuffled order, so the masks must map back from sorted order.
PROBS = np.array([0.15, 0.5, 0.1, 0.25])
LOGITS = jnp.asarray(np.log(PROBS)[None], jnp.float32)


def kept(**kw) -> set[int]:
    x = np.asarray(process_logits(LOGITS, kw.pop("temperature", 1.0), **kw))[0]
    return set(np.flatnonzero(np.isfinite(x)).tolist())


@pytest.mark.parametrize(
    "kw, want",
    [
        ({}, {0, 1, 2, 3}),
        ({"top_k": 1}, {1}),
        ({"top_k": 2}, {1, 3}),
        ({"top_k": 9}, {0, 1, 2, 3}),
        ({"top_p": 0.45}, {1}),
        ({"top_p": 0.7}, {1, 3}),
        ({"top_p": 0.8}, {0, 1, 3}),
        ({"top_p": 0.95}, {0, 1, 2, 3}),
        ({"min_p": 0.4}, {1, 3}),
        ({"min_p": 0.25}, {0, 1, 3}),
        ({"min_p": 0.1}, {0, 1, 2, 3}),
        # top-p after top-k renormalises over {1, 3, 0}: 0.56, 0.28, 0.17 -> mass before 0.83
        ({"top_k": 3, "top_p": 0.8}, {1, 3}),
        # temperature 0.5 squares the odds: p ~ 0.25, 0.0625 vs 0.0225 -> 0.0225 / 0.25 < 0.1
        ({"temperature": 0.5, "min_p": 0.1}, {1, 3}),
    ],
)
def test_filters_keep_exactly_the_right_tokens(kw, want):
    assert kept(**kw) == want


def test_processing_is_float32_and_keeps_logit_values():
    x = process_logits(LOGITS.astype(jnp.bfloat16), 2.0, top_k=2)
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(x)[0, [1, 3]], np.asarray(LOGITS.astype(jnp.bfloat16), np.float32)[0, [1, 3]] / 2
    )


def test_top_k_samples_only_from_the_top_k():
    logits = jnp.broadcast_to(LOGITS, (2000, 4))
    rows = jnp.arange(2000)
    tokens = np.asarray(sample(logits, (1.0, 2, 1.0, 0.0), jax.random.PRNGKey(0), rows, rows))
    assert set(np.unique(tokens).tolist()) == {1, 3}
    # Frequencies follow the renormalised probabilities 2/3, 1/3.
    assert abs((tokens == 1).mean() - 2 / 3) < 0.05


def test_greedy_and_temperature_to_zero():
    logits = jax.random.normal(jax.random.PRNGKey(1), (16, 259)) * 3
    rows = jnp.arange(16)
    greedy = np.asarray(sample(logits, (0.0, 0, 1.0, 0.0), jax.random.PRNGKey(0), rows, rows))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
    cold = sample(logits, (1e-4, 0, 1.0, 0.0), jax.random.PRNGKey(5), rows, rows)
    np.testing.assert_array_equal(np.asarray(cold), greedy)


def test_seeds_rows_and_positions():
    logits = jnp.zeros((16, 259))  # uniform: every draw is pure key
    rows, pos = jnp.arange(16), jnp.full((16,), 7)
    draw = lambda seed, r=rows, p=pos, lg=logits: np.asarray(
        sample(lg, (1.0, 0, 1.0, 0.0), jax.random.PRNGKey(seed), r, p)
    )
    np.testing.assert_array_equal(draw(3), draw(3))
    assert (draw(3) != draw(4)).sum() > 8
    assert (draw(3) != draw(3, p=pos + 1)).sum() > 8
    # A row's draw depends on its own id, not on the other rows of the batch.
    np.testing.assert_array_equal(draw(3)[5:6], draw(3, r=rows[5:6], p=pos[5:6], lg=logits[5:6]))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\)"),
    ],
)
def test_invalid_sampling_params(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_from_config_and_overrides():
    cfg = load_config("llama:tiny,decode.temperature=0.7,decode.top_k=5")
    p = SamplingParams.from_config(cfg.decode, top_p=0.9, seed=None)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (0.7, 5, 0.9, 0.0, 0)
    assert not p.greedy and p.processing() == (0.7, 5, 0.9, 0.0)
    assert SamplingParams(top_k=5).processing() == (0.0, 0, 1.0, 0.0)  # greedy ignores filters
