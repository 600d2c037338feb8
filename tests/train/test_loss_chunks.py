"""The lm task's chunked vocabulary projection + loss equals the one-go form (values, metric sums
and gradients), also sharded."""

import jax
import numpy as np
import pytest

from tessera.train.trainer import Trainer

from .helpers import tiny_config


def loss_and_grads(tmp_path, chunk: int, **mesh):
    cfg = tiny_config(f"train.loss_chunk={chunk},train.z_loss=0.001", **mesh)
    trainer = Trainer(cfg, str(tmp_path), None if mesh else jax.devices()[:1])
    params = trainer.init_state()["params"]
    batch = trainer.device_batch(next(trainer.task.make_data("train")))
    loss, grads = jax.device_get(trainer.grads(params, batch))
    sums = jax.device_get(trainer.task.loss(trainer.spec.merge(params), batch, None))
    return loss, grads, sums


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return loss_and_grads(tmp_path_factory.mktemp("whole"), 0)


@pytest.mark.parametrize("chunk, mesh", [(8, {}), (16, {"data": 2, "fsdp": 2, "sequence": 2})])
def test_chunked_loss_equals_whole(whole, tmp_path, chunk, mesh):
    loss, grads, (total, weight, sums) = loss_and_grads(tmp_path, chunk, **mesh)
    loss_0, grads_0, (total_0, weight_0, sums_0) = whole
    np.testing.assert_allclose(loss, loss_0, rtol=1e-5)
    np.testing.assert_allclose(total, total_0, rtol=1e-5)
    assert weight == weight_0
    for k in sums_0:
        np.testing.assert_allclose(sums[k], sums_0[k], rtol=1e-5, err_msg=k)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_0
    )
