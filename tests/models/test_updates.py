"""Per-layer statistics and rule-updated parameters located by depth: the rows of a stacked
statistic belong to the layers that declare it, and each rule-updated parameter (prefix block,
scanned unit, unrolled units) is fed its own layer's rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.models.create import ModelSpec
from tessera.models.updates import apply_rule_updates, rule_mask, stat_depths
from tests.models.helpers import random_params

# MoE at depths 1 (prefix), 2 and 4 (the unit's first block, repeated twice).
LAYOUT = dict(prefix=("attention:mlp", "attention:moe"), pattern=("attention:moe", "attention:mlp"),
              num_layers=6)


def moe_model(scan_layers):
    cfg = load_config("mixtral:tiny,model.dtype=float32").model
    cfg.update(d_model=32, num_heads=2, head_dim=16, vocab_size=61, scan_layers=scan_layers,
               **LAYOUT)
    cfg.moe.update(num_experts=4, expert_dim=8, router_bias=True, bias_update_rate=0.5)
    return ModelSpec(cfg)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_rule_targets_follow_the_layout(scan_layers):
    spec = moe_model(scan_layers)
    assert stat_depths(spec.cfg, "expert_load") == [1, 2, 4]
    assert stat_depths(spec.cfg, "no_such_stat") == []
    found = {t.path: (t.rows, t.stacked) for t in spec.rule_targets}
    if scan_layers:
        assert found == {("prefix", 1, "channel", "router_bias"): ((0,), False),
                         ("units", "blocks", 0, "channel", "router_bias"): ((1, 2), True)}
    else:
        assert found == {("prefix", 1, "channel", "router_bias"): ((0,), False),
                         ("units", 0, "blocks", 0, "channel", "router_bias"): ((1,), False),
                         ("units", 1, "blocks", 0, "channel", "router_bias"): ((2,), False)}
    mask = rule_mask(spec.rule_targets, spec.shapes)
    assert sum(jax.tree.leaves(mask)) == len(found)

    params = random_params(spec)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
    aux = jax.jit(lambda p: spec.merge(p)(tokens).aux)(params)
    load = aux["expert_load"]
    assert load.shape == (3, 4)  # the model's rows are the declared depths' rows
    new = apply_rule_updates(spec.rule_targets, params, {"expert_load": load})
    step = lambda row: 0.5 * np.sign(np.mean(load[row]) - load[row])
    np.testing.assert_allclose(new["prefix"][1]["channel"]["router_bias"],
                               params["prefix"][1]["channel"]["router_bias"] + step(0))
    for repeat, row in ((0, 1), (1, 2)):
        if scan_layers:
            got = new["units"]["blocks"][0]["channel"]["router_bias"][repeat]
            old = params["units"]["blocks"][0]["channel"]["router_bias"][repeat]
        else:
            got = new["units"][repeat]["blocks"][0]["channel"]["router_bias"]
            old = params["units"][repeat]["blocks"][0]["channel"]["router_bias"]
        np.testing.assert_allclose(got, old + step(row), rtol=1e-6)
    # Everything else is the same object, untouched.
    assert new["embed"] is params["embed"]
