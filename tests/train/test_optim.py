"""Optimizer and loss options: the learning-rate schedules, the weight-decay mask, z-loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.models.create import ModelSpec
from tessera.train.optimizers import decay_mask, make_optimizer, make_schedule
from tessera.train.tasks.lm import cross_entropy
from tessera.train.trainer import Trainer

from .helpers import tiny_config


def optim_config(**optim):
    cfg = load_config("llama:tiny").optim
    cfg.update({"learning_rate": 1.0, "warmup_steps": 10, "end_lr_factor": 0.1, **optim})
    return cfg


@pytest.mark.parametrize("schedule, expected", [
    # step: lr, for warmup 10 then decay over the remaining 100 of 110 steps to 0.1.
    ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 200: 0.1}),
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 200: 0.1}),
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0}),
])
def test_schedule_values(schedule, expected):
    fn = make_schedule(optim_config(schedule=schedule), total_steps=110)
    got = {step: float(fn(step)) for step in expected}
    assert got == pytest.approx(expected, abs=1e-6)
    if schedule == "cosine":  # a quarter into the decay
        assert float(fn(35)) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    without_warmup = make_schedule(optim_config(schedule=schedule, warmup_steps=0), 100)
    assert float(without_warmup(0)) == pytest.approx(1.0)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown 'step'; known: cosine, linear, constant"):
        make_schedule(optim_config(schedule="step"), 10)


def test_weight_decay_mask_in_one_adamw_step():
    """With zero gradients AdamW's update is only the decay, -lr * wd * param: matrices (the
    embedding, projections) shrink; norm scales and biases (Mamba's conv bias) do not move."""
    cfg = load_config("mamba:tiny").model
    cfg.update(d_model=32, vocab_size=61)
    spec = ModelSpec(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(1 + rng.random(s.shape), s.dtype), spec.shapes)
    optim = optim_config(schedule="constant", warmup_steps=0, weight_decay=0.1, clip_norm=0.0)
    tx, _ = make_optimizer(optim, 10, decay_mask(spec.axis_names))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    decayed = {}

    def check(path, update, param):
        name = jax.tree_util.keystr(path)
        if np.any(update):
            np.testing.assert_allclose(update, -1.0 * 0.1 * param, rtol=1e-6, err_msg=name)
        decayed[name] = bool(np.any(update))

    jax.tree_util.tree_map_with_path(check, updates, params)
    mixer = "['units']['blocks'][0]['mixer']"
    assert decayed["['embed']['embedding']"]
    assert decayed[mixer + "['in_proj']"] and decayed[mixer + "['out_proj']"]
    assert not decayed["['final_norm']['scale']"]
    assert not decayed["['units']['blocks'][0]['norm1']['scale']"]
    assert not decayed[mixer + "['conv_bias']"] and not decayed[mixer + "['D']"]


def test_z_loss_value_and_gradient():
    """z-loss adds z * logsumexp(logits)^2 per unmasked token, and its gradient w.r.t. the
    logits 2 z lse softmax."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 7)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (2, 3)), jnp.int32)
    mask = jnp.asarray([[1, 1, 0], [1, 0, 1]], jnp.float32)
    z = 0.01
    lse = jax.nn.logsumexp(logits, axis=-1)
    plain, weight, sums = cross_entropy(logits, targets, mask)
    total, _, sums_z = cross_entropy(logits, targets, mask, z_loss=z)
    assert float(weight) == 4 and float(sums_z["nll"]) == float(sums["nll"]) == float(plain)
    assert float(total) == pytest.approx(float(plain) + z * float(jnp.sum(lse**2 * mask)))
    grad = jax.grad(lambda x: cross_entropy(x, targets, mask, z_loss=z)[0])(logits)
    grad_plain = jax.grad(lambda x: cross_entropy(x, targets, mask)[0])(logits)
    extra = 2 * z * lse[..., None] * jax.nn.softmax(logits) * mask[..., None]
    np.testing.assert_allclose(grad - grad_plain, extra, rtol=1e-5, atol=1e-7)


def test_z_loss_reaches_the_train_loss_and_gradients(tmp_path):
    """``train.z_loss`` in the trainer: the loss gains z * mean(lse^2) and the gradients
    change."""
    out, params = {}, None
    for z in (0.0, 0.1):
        trainer = Trainer(tiny_config(f"train.z_loss={z}", data=1), str(tmp_path),
                          jax.devices()[:1])
        params = trainer.init_state()["params"] if params is None else params
        batch = trainer.device_batch(next(trainer.task.make_data("train")))
        out[z] = jax.device_get(trainer.grads(params, batch))

    @jax.jit
    def mean_lse2(params, batch):
        model = trainer.spec.merge(params)
        logits = model(batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"]).logits
        lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        return jnp.sum(lse**2 * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    (loss_0, grads_0), (loss_z, grads_z) = out[0.0], out[0.1]
    assert loss_z == pytest.approx(loss_0 + 0.1 * float(mean_lse2(params, batch)), rel=1e-5)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads_0),
                                                           jax.tree.leaves(grads_z)))
    assert diff > 1e-3


def test_bf16_parameters_keep_their_state_dtypes(tmp_path):
    """With ``model.param_dtype=bfloat16`` the gradients, the Adam moments and the parameters
    stay bf16 across steps: the loss weight's float32 division once made the moments float32
    after the first step, so the donated state no longer aliased the new one (and on a pod a
    third more HBM: deepseek:v3 on v5p-256). Two real steps on one device."""
    cfg = tiny_config("model.param_dtype=bfloat16,model.dtype=bfloat16", data=1)
    trainer = Trainer(cfg, str(tmp_path), jax.devices()[:1])
    state = trainer.init_state()
    kinds = [(x.dtype, x.shape) for x in jax.tree.leaves(state)]
    assert {str(x.dtype) for x in jax.tree.leaves(state["params"])} == {"bfloat16"}
    batch = trainer.device_batch(next(trainer.task.make_data("train")))
    for _ in range(2):
        state, metrics = trainer.step(state, batch)
        assert [(x.dtype, x.shape) for x in jax.tree.leaves(state)] == kinds
    assert bool(metrics["finite"])
    assert trainer._step._cache_size() == 1  # one compile: the second step did not retrace
