"""``checkpoint.directory``: checkpoints outside the workdir (on a pod, storage every host
reaches), found again by resume and by the readers of a workdir; async saves get manifests."""

from __future__ import annotations

import os

from tessera.serve.loading import restore_params
from tessera.train.checkpoints import MANIFEST, verify_manifest
from tessera.train.trainer import Trainer, train
from tests.train.helpers import tiny_config


def test_checkpoints_go_to_the_directory_and_are_found_again(tmp_path):
    workdir, elsewhere = tmp_path / "work", tmp_path / "shared" / "ckpt"
    cfg = tiny_config(f"train.steps=4,checkpoint.every=2,checkpoint.async_save=True,"
                      f"checkpoint.directory={elsewhere}")
    train(cfg, str(workdir))
    assert not (workdir / "checkpoints").exists()
    assert sorted(os.listdir(elsewhere)) == ["2", "4"]
    for step in ("2", "4"):  # written by the background thread once orbax committed the step
        assert os.path.isfile(elsewhere / step / MANIFEST)
        assert verify_manifest(str(elsewhere / step)) is None

    cfg.train.steps = 6
    result = train(cfg, str(workdir))
    assert result.resumed_from == 4 and result.step == 6

    trainer = Trainer(cfg, str(workdir))  # readers take the directory from config.json
    step, _ = restore_params(trainer.spec, str(workdir), trainer.state_shardings["params"])
    assert step == 6


def test_a_step_saved_with_the_single_json_data_item_still_restores(tmp_path):
    """Steps written before per-process data positions hold one ``data`` JSON item."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from tessera.train.checkpoints import Checkpointer

    state = {"params": {"w": jnp.arange(4.0)}, "step": jnp.int32(7)}
    directory = tmp_path / "checkpoints"
    old = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()},
    )
    old.save(7, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                        data=ocp.args.JsonSave({"position": 3})))
    old.close()
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    step, restored, data_state = Checkpointer(str(tmp_path), read_only=True).restore(None, target)
    assert step == 7 and data_state == {"position": 3}
    assert list(restored["params"]["w"]) == [0.0, 1.0, 2.0, 3.0]
