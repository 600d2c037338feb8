"""Shared tiny float32 models for the decode tests, and the uncached oracle they compare with."""

import jax
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.models.create import ModelSpec
from tessera.serve import Decoder, single_device_mesh
from tessera.sharding import make_rules

TINY = "llama:tiny,model.dtype=float32,model.init_std=0.1"


def make_model(spec_str: str, seed: int = 0):
    cfg = load_config(spec_str)
    spec = ModelSpec(cfg.model)
    params = spec.init(seed, single_device_mesh(), make_rules())
    return cfg, spec, params


@pytest.fixture(scope="session")
def tiny():
    return make_model(TINY)


@pytest.fixture(scope="session")
def tiny_decoder(tiny):
    _, spec, params = tiny
    return Decoder(spec, params, single_device_mesh(), decode_chunk=4)


def reference_greedy(spec, params, prompts, steps):
    """Greedy tokens from full forward passes without a cache, re-run on the growing sequences.

    Rows are right-padded to one length with segment id 0 (causal attention never reads the
    padding), so one compiled forward serves every step.
    """
    fwd = jax.jit(lambda p, t, s: spec.merge(p)(t, segment_ids=s).logits)
    seqs = [list(p) for p in prompts]
    width = max(map(len, seqs)) + steps
    for _ in range(steps):
        toks = np.zeros((len(seqs), width), np.int32)
        seg = np.zeros((len(seqs), width), np.int32)
        for b, s in enumerate(seqs):
            toks[b, : len(s)], seg[b, : len(s)] = s, 1
        logits = np.asarray(fwd(params, toks, seg))
        for b, s in enumerate(seqs):
            s.append(int(np.argmax(logits[b, len(s) - 1])))
    return [s[len(p) :] for s, p in zip(seqs, prompts)]
