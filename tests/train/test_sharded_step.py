"""One train step gives the same loss, gradients and parameters on every mesh."""

import jax
import numpy as np
import pytest

from tessera.train.trainer import Trainer

from .helpers import tiny_config


def one_step(cfg, tmp_path, devices=None):
    trainer = Trainer(cfg, str(tmp_path), devices)
    state = trainer.init_state()
    init_params = jax.device_get(state["params"])
    batch = trainer.device_batch(next(trainer.task.make_data("train")))
    loss, grads = jax.device_get(trainer.grads(state["params"], batch))
    state, metrics = trainer.step(state, batch)
    metrics = dict(jax.device_get(metrics), grad_loss=loss, grads=grads)
    return trainer, init_params, jax.device_get(state["params"]), metrics


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return one_step(_single_cfg(), tmp_path_factory.mktemp("single"), jax.devices()[:1])


def _single_cfg():
    cfg = tiny_config()
    cfg.mesh.update(data=1)
    return cfg


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8),
                                  dict(data=4, sequence=2), dict(data=4, expert=2)])
def test_sharded_step_matches_single_device(mesh, single, tmp_path):
    _, init_1, params_1, metrics_1 = single
    trainer, init_n, params_n, metrics_n = one_step(tiny_config(**mesh), tmp_path)
    assert trainer.mesh.devices.size == 8
    # The axes are used: sequence splits rows' length and embedding dims, expert the batch.
    used = {a for spec in (trainer.batch_shardings["inputs"].spec,
                           trainer.state_shardings["params"]["embed"]["embedding"].spec)
            for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes)}
    assert {a for a in ("sequence", "expert") if mesh.get(a, 1) > 1} <= used, used
    # Parameters are created sharded, with the same values whatever the mesh.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), init_1, init_n)
    np.testing.assert_allclose(metrics_n["loss"], metrics_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_n["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(metrics_n["grad_loss"], metrics_1["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 metrics_1["grads"], metrics_n["grads"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), init_1, params_1))
    assert max(moved) > 1e-4
    assert_same_update(init_1, params_1, params_n)


def assert_same_update(init, params, other):
    """Two one-step results from the same ``init`` applied the same update, tensor by tensor,
    to 1% in norm. (Not elementwise: Adam divides each gradient by its own magnitude, so
    rounding noise in a near-zero gradient moves that one entry by a few % of the lr.)"""

    def check(path, start, a, b):
        step = np.linalg.norm(a - start)
        assert np.linalg.norm(b - a) <= 1e-2 * step + 1e-12, (jax.tree_util.keystr(path), step)

    jax.tree_util.tree_map_with_path(check, init, params, other)


def test_params_are_sharded_on_the_mesh(tmp_path):
    trainer = Trainer(tiny_config(data=2, fsdp=2, tensor=2), str(tmp_path))
    params = trainer.init_state()["params"]
    wq = params["units"]["blocks"][0]["mixer"]["wq"]
    spec = wq.sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)  # [layers, embed, heads, head_dim]
    assert len(wq.addressable_shards) == 8
    assert wq.addressable_shards[0].data.shape == (2, 64, 2, 32)


def test_grad_accumulation_matches_full_batch(single, tmp_path):
    _, init, p_full, m_full = single
    cfg = _single_cfg()
    cfg.optim.grad_accum_steps = 4
    _, _, p_acc, m_acc = one_step(cfg, tmp_path, jax.devices()[:1])
    np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-4)
    assert_same_update(init, p_full, p_acc)


def loss_and_grads(cfg, tmp_path, devices=None):
    """The first batch's loss and gradients (one compile: the update itself is checked on the
    llama meshes above and is family-independent)."""
    trainer = Trainer(cfg, str(tmp_path), devices)
    state = trainer.init_state()
    batch = trainer.device_batch(next(trainer.task.make_data("train")))
    return jax.device_get(trainer.grads(state["params"], batch))


# mamba2 runs inside hybrid (three Mamba-2 blocks and an attention block); rwkv6 and retnet
# have sharded forward tests of their own (tests/layers).
@pytest.mark.parametrize("family", ["mamba", "hybrid", "deepseek", "rwkv7"])
def test_other_families_sharded_step_matches_single_device(family, tmp_path):
    loss_1, grads_1 = loss_and_grads(tiny_config(family=family, data=1), tmp_path / "one",
                                     jax.devices()[:1])
    loss_n, grads_n = loss_and_grads(tiny_config(family=family, fsdp=4, tensor=2),
                                     tmp_path / "mesh")
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    # float32 sums in another order: an absolute floor of 1e-5 of each tensor's largest gradient
    # (elements far below it differ by a larger relative amount, e.g. 1.4e-7 on a 4e-4 entry).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max()),
        grads_1, grads_n,
    )
