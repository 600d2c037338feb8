"""MoE language models in the Trainer: an expert-parallel train step equals the single-device
one, the router bias is balanced by its rule after each step (and only then), a tiny MoE LM
learns, per-layer router statistics reach metrics.jsonl, and a mesh whose expert axis does not
divide the experts is refused when the Trainer is built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.train.metrics import flatten_metrics, read_metrics
from tessera.train.optimizers import make_optimizer
from tessera.train.trainer import Trainer, train

from .helpers import one_step, tiny_config
from .test_sharded_step import assert_same_update

# Router bias balanced by rule, both router losses on: everything the step does for an MoE.
MOE = ("model.moe.router_bias=True,model.moe.bias_update_rate=0.01,model.moe.aux_loss_coef=0.01,"
       "model.moe.z_loss_coef=0.001")


def test_expert_parallel_train_step_matches_single_device(tmp_path):
    """Loss, router statistics and the updated parameters (optimizer and bias rule) of one step
    with the experts split 4 ways and the batch 8 ways equal those on one device."""
    _, init_1, params_1, m_1 = one_step(tiny_config(MOE, family="mixtral", data=1),
                                        tmp_path / "one", jax.devices()[:1])
    trainer, init_n, params_n, m_n = one_step(
        tiny_config(MOE, family="mixtral", data=2, expert=4), tmp_path / "ep"
    )
    # The experts are split over the expert axis and the dispatch exchanges tokens.
    wi = trainer.state_shardings["params"]["units"]["blocks"][0]["channel"]["wi_gate"]
    assert tuple(wi.spec)[:2] == (None, "expert")
    assert "all_to_all" in trainer.lower().as_text()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), init_1, init_n)
    np.testing.assert_allclose(m_n["loss"], m_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_n["grad_norm"], m_1["grad_norm"], rtol=1e-4)
    for key in ("aux/moe_balance_loss", "aux/moe_z_loss", "aux/expert_load"):
        np.testing.assert_allclose(m_n[key], m_1[key], rtol=1e-5, err_msg=key)
    assert_same_update(init_1, params_1, params_n)
    # The bias moved by its rule (+-0.01 per expert), the same on both meshes.
    bias_1 = params_1["units"]["blocks"][0]["channel"]["router_bias"]
    bias_n = params_n["units"]["blocks"][0]["channel"]["router_bias"]
    np.testing.assert_allclose(np.abs(bias_1), 0.01, rtol=1e-6)
    np.testing.assert_allclose(bias_n, bias_1, rtol=1e-6)


def skewed_trainer(rate, tmp_path):
    """One MoE layer (sigmoid scores, top-2 of 4) with the optimizer frozen (lr 0) and a router
    that sends every token to expert 0: every embedding carries 1.0 in coordinate 0, which only
    expert 0's router column reads; the other columns are random."""
    cfg = tiny_config(
        "model.num_layers=1,optim.learning_rate=0.0,model.moe.score_func=sigmoid,"
        f"model.moe.router_bias=True,model.moe.bias_update_rate={rate},model.moe.aux_loss_coef=0.0",
        family="mixtral", data=1,
    )
    trainer = Trainer(cfg, str(tmp_path), jax.devices()[:1])
    state = trainer.init_state()
    params = jax.tree.map(np.array, jax.device_get(state["params"]))
    params["embed"]["embedding"][:, 0] = 1.0
    router = 0.3 * np.random.default_rng(0).normal(size=(1, cfg.model.d_model, 4))
    router[:, 0, :] = 0.0
    router[:, 0, 0] = 0.2
    params["units"]["blocks"][0]["channel"]["router"] = router.astype(np.float32)
    state["params"] = jax.device_put(params, trainer.state_shardings["params"])
    return trainer, state, trainer.device_batch(next(trainer.task.make_data("train")))


def load_ratios(trainer, state, batch, steps):
    """max / min expert load of each step (min floored at 1e-3), and the final state."""
    ratios = []
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
        load = np.asarray(metrics["aux/expert_load"])[0]
        ratios.append(load.max() / max(load.min(), 1e-3))
    return ratios, state


def test_bias_balancing_evens_a_skewed_load(tmp_path):
    trainer, state, batch = skewed_trainer(0.05, tmp_path / "on")
    ratios, state = load_ratios(trainer, state, batch, 12)
    # Step 1 routes with the initial zero bias: expert 0 takes nearly half of all assignments
    # (every token's pair), expert 1 almost none.
    assert ratios[0] > 50, ratios
    assert max(ratios[-4:]) < 2.5, ratios  # a handful of steps later: nearly even
    bias = np.asarray(state["params"]["units"]["blocks"][0]["channel"]["router_bias"])[0]
    assert bias[0] == pytest.approx(bias.min()) and bias[0] < -0.2  # the crowded expert pays
    # Without the rule nothing moves: the load stays as skewed as it started.
    trainer, state, batch = skewed_trainer(0.0, tmp_path / "off")
    ratios_off, state = load_ratios(trainer, state, batch, 3)
    assert min(ratios_off) > 50 and ratios_off[0] == pytest.approx(ratios[0])
    np.testing.assert_array_equal(state["params"]["units"]["blocks"][0]["channel"]["router_bias"],
                                  0.0)


def test_tiny_moe_lm_learns_and_logs_router_statistics(tmp_path):
    cfg = tiny_config("train.steps=30,train.log_every=10,optim.warmup_steps=5,"
                      "data.seq_len=64,model.moe.router_bias=True,model.moe.bias_update_rate=1e-3",
                      family="mixtral")
    result = train(cfg, str(tmp_path), devices=jax.devices()[:1])
    first = result.losses[1]
    last = np.mean([result.losses[s] for s in range(26, 31)])
    assert last < first - 1.5, result.losses
    rows = read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in rows] == [1, 10, 20, 30]
    for layer in (0, 1):
        for key in ("aux/expert_load_max", "aux/expert_load_min", "aux/dropped_fraction"):
            assert f"{key}/layer_{layer}" in rows[-1], sorted(rows[-1])
        # Relative loads: the max is above 1 (balanced) and the min below, unless all are even.
        assert rows[-1][f"aux/expert_load_min/layer_{layer}"] <= 1.0
        assert rows[-1][f"aux/expert_load_max/layer_{layer}"] >= 1.0
        assert rows[-1][f"aux/dropped_fraction/layer_{layer}"] == 0.0
    assert rows[-1]["aux/moe_balance_loss"] > 0
    # The router biases are rule-updated: in the train state, moved by the rule only.
    assert [t.path for t in Trainer(cfg, str(tmp_path / "again")).rule_targets] == [
        ("units", "blocks", 0, "channel", "router_bias")]


def test_flatten_metrics_names_rows_by_depth():
    row = {"loss": np.float32(2.0), "aux/expert_load": np.array([[0.5, 1.5], [1.0, 1.0]]),
           "aux/dropped_fraction": np.array([0.25, 0.0])}
    flat = flatten_metrics(row, lambda key: [3, 5])  # DeepSeek-like: MoE from layer 3 on
    assert flat == {"loss": 2.0, "aux/expert_load_max/layer_3": 1.5,
                    "aux/expert_load_min/layer_3": 0.5, "aux/expert_load_max/layer_5": 1.0,
                    "aux/expert_load_min/layer_5": 1.0, "aux/dropped_fraction/layer_3": 0.25,
                    "aux/dropped_fraction/layer_5": 0.0}
    with pytest.raises(ValueError, match="has 2 rows for 1 layers"):
        flatten_metrics(row, lambda key: [3])


def test_expert_axis_must_divide_the_experts(tmp_path):
    cfg = tiny_config("model.moe.num_experts=6", family="mixtral", data=2, expert=4)
    with pytest.raises(ValueError, match=r"^model\.moe\.num_experts=6 is not divisible by the "
                                         r"expert axis of the mesh \(mesh\.expert=4\)$"):
        Trainer(cfg, str(tmp_path))


def test_frozen_parameters_are_left_alone_by_the_optimizer():
    """The optimizer of a model with rule-updated parameters: their gradients are zeroed and
    they are not decayed, so their update is exactly zero (whatever their gradient); the other
    parameters get the update they get in a tree without them."""
    params = {"w": jnp.ones((3, 3)), "bias": jnp.ones((4,)), "m": jnp.ones((2, 2))}
    grads = {"w": jnp.full((3, 3), 0.1), "bias": jnp.full((4,), 100.0), "m": jnp.zeros((2, 2))}
    decay = {"w": True, "bias": False, "m": True}
    frozen = {"w": False, "bias": True, "m": True}  # a frozen matrix would otherwise decay
    optim = tiny_config().optim
    optim.update(learning_rate=0.1, weight_decay=0.5, clip_norm=1.0)
    tx, _ = make_optimizer(optim, 10, decay, frozen=frozen)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["bias"], 0.0)
    np.testing.assert_array_equal(updates["m"], 0.0)
    # "w" gets the update it gets without the frozen entries in the tree.
    alone, _ = make_optimizer(optim, 10, {"w": True})
    want, _ = alone.update({"w": grads["w"]}, alone.init({"w": params["w"]}), {"w": params["w"]})
    np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)
