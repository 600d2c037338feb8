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
