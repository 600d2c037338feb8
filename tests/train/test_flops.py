"""The analytic FLOP counter agrees with XLA's cost analysis of an unscanned model."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.models.registry import build_model
from tessera.train.flops import (
    causal_saving_per_token,
    forward_flops_per_token,
    peak_flops_per_device,
    vit_flops_per_example,
)
from tessera.train.tasks import get_task


@pytest.mark.parametrize("extra", ["", ",model.num_kv_heads=1,model.tie_embeddings=True"])
def test_forward_flops_match_cost_analysis(extra):
    cfg = load_config("llama:tiny,model.dtype=float32,model.scan_layers=False,model.d_model=256,"
                      "model.num_heads=4,model.head_dim=64,model.mlp_dim=768" + extra)
    model = build_model(cfg.model, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, t = 2, 128

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    tokens = jnp.zeros((b, t), jnp.int32)
    cost = jax.jit(forward).lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = forward_flops_per_token(cfg.model, t) * b * t
    assert cost["flops"] == pytest.approx(analytic, rel=0.05)


@pytest.mark.parametrize("extra", ["", ",model.pool=map,model.pos_embedding=sincos2d"])
def test_vit_forward_flops_match_cost_analysis(extra):
    """Matmul FLOPs counted analytically vs everything XLA counts (the erf GELU, norms and softmax
    add ~4.5% at this width)."""
    cfg = load_config("vit:tiny,model.scan_layers=False,model.image_size=16,model.num_layers=2,"
                      "model.d_model=256,model.head_dim=64,model.mlp_dim=1024" + extra).model
    graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    b = 2

    def forward(state, images):
        return nnx.merge(graphdef, state)(images).logits

    images = jnp.zeros((b, 16, 16, 3), jnp.float32)
    cost = jax.jit(forward).lower(state, images).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = vit_flops_per_example(cfg) * b
    assert analytic <= cost["flops"] <= 1.07 * analytic


@pytest.mark.parametrize("preset, gmacs", [("ti16", 1.26), ("s16", 4.6), ("b16", 17.6),
                                           ("b32", 4.4), ("l16", 61.6), ("h14", 167.4)])
def test_vit_flops_match_published_figures(preset, gmacs):
    """The GFLOPs (multiply-adds) of timm's / DeiT's tables for 224 x 224 images."""
    cfg = load_config(f"vit:{preset}").model
    assert vit_flops_per_example(cfg) / 2e9 == pytest.approx(gmacs, rel=0.01)
    assert causal_saving_per_token(cfg, 197) == 0  # bidirectional: no causal half to drop


def test_train_flops_and_peak():
    cfg = load_config("llama:tiny")
    per_token = forward_flops_per_token(cfg.model, cfg.data.seq_len)
    assert get_task(cfg).flops_per_example() == per_token * cfg.data.seq_len
    peak, source = peak_flops_per_device()
    # The source carries the probe's measurement: the printed MFU can be judged against it.
    probe = re.fullmatch(
        r"cpu matmul probe: (\d+\.\d) GFLOP/s, best of 10(, split over (\d+) devices)?", source
    )
    assert probe, source
    devices = int(probe.group(3) or 1)
    assert devices == jax.device_count()
    assert peak * devices / 1e9 == pytest.approx(float(probe.group(1)), abs=0.051)
