"""Task losses and metrics on fake model outputs: auxiliary losses, padding rows, bad layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.models.lm import ModelOutput
from tessera.train.tasks import Feature, get_task
from tessera.train.tasks.classify import softmax_cross_entropy
from tessera.train.tasks.lm import cross_entropy

RNG = jax.random.key(0)


def fake_model(logits, aux=None):
    return lambda tokens, **kw: ModelOutput(logits=logits, aux=aux or {})


def lm_batch(b=2, t=5):
    ids = jnp.arange(b * t, dtype=jnp.int32).reshape(b, t) % 7
    return {"inputs": ids, "targets": ids, "segment_ids": jnp.ones_like(ids),
            "positions": jnp.zeros_like(ids), "loss_mask": jnp.ones((b, t), jnp.float32)}


def test_lm_adds_and_reports_aux_losses():
    task = get_task(load_config("llama:tiny"))
    logits = jax.random.normal(RNG, (2, 5, 7))
    batch = lm_batch()
    batch["segment_ids"] = batch["segment_ids"].at[0, 3:].set(0)  # 2 padding slots of 10
    aux = {"moe_balance_loss": jnp.float32(0.5), "router_z_loss": jnp.float32(0.25),
           "moe_load": jnp.ones((2, 4))}
    total, weight, sums = task.loss(fake_model(logits, aux), batch, RNG)
    plain, plain_weight, plain_sums = task.loss(fake_model(logits), batch, RNG)
    assert weight == plain_weight == 10
    np.testing.assert_allclose(total, plain + 0.75 * 10, rtol=1e-6)
    # Statistics are reported too (not added to the loss), weighted like the losses so that the
    # metric is their mean over micro-batches.
    assert set(sums) == {"nll", "accuracy", "aux/moe_balance_loss", "aux/router_z_loss",
                         "aux/moe_load", "packing", "slots"}
    metrics = task.metrics(sums, weight)
    segments = np.asarray(batch["segment_ids"])
    assert "slots" not in metrics
    assert metrics["packing"] == pytest.approx((segments != 0).mean()) == pytest.approx(0.8)
    assert metrics["aux/moe_balance_loss"] == pytest.approx(0.5)
    np.testing.assert_allclose(metrics["aux/moe_load"], np.ones((2, 4)), rtol=1e-6)
    assert metrics["nll"] == pytest.approx(float(plain_sums["nll"]) / 10)
    assert task.eval_metrics(sums, weight)["perplexity"] == pytest.approx(np.exp(metrics["nll"]))


def test_lm_z_loss():
    logits = jax.random.normal(RNG, (2, 5, 7))
    batch = lm_batch()
    total, _, sums = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss=0.1)
    lse = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(total, sums["nll"] + 0.1 * jnp.sum(lse**2), rtol=1e-6)


def test_classify_loss_skips_padding_rows():
    logits = jnp.array([[2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    labels = jnp.array([0, 2, -1], jnp.int32)
    total, weight, sums = softmax_cross_entropy(logits, labels)
    expected = -jax.nn.log_softmax(logits[0])[0] - jax.nn.log_softmax(logits[1])[2]
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert float(weight) == 2 and float(sums["accuracy"]) == 1


def test_classify_reads_logits_of_batch_size_by_classes():
    task = get_task(load_config("classify:tiny"))
    batch = {"inputs": jnp.zeros((2, 3), jnp.int32), "segment_ids": jnp.ones((2, 3), jnp.int32),
             "positions": jnp.zeros((2, 3), jnp.int32), "label": jnp.array([1, 3], jnp.int32)}
    seen = {}

    def model(tokens, **kw):
        seen.update(kw)
        return ModelOutput(logits=jnp.zeros((2, 4)), aux={"moe_balance_loss": jnp.float32(1.0)})

    total, weight, sums = task.loss(model, batch, RNG)
    assert set(seen) == {"segment_ids", "positions"}  # every non-label key but the inputs
    np.testing.assert_allclose(total, 2 * np.log(4) + 2.0, rtol=1e-6)
    assert float(sums["aux/moe_balance_loss"]) == 2.0
    with pytest.raises(ValueError, match=r"needs logits \[batch, model.num_classes\]"):
        task.loss(fake_model(jnp.zeros((2, 3, 259))), batch, RNG)


def test_feature_axes_cover_the_batch_axis():
    assert Feature((4,), "int32", ("batch", "length")).axes == ("batch", "length")
    with pytest.raises(ValueError, match="must name the batch axis and each of shape"):
        Feature((4,), "int32", ("length",))
