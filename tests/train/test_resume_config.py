"""Resume tells the truth: a finished run does nothing and says so; a changed config is listed
and kept beside the earlier ones; a change of parameter shapes is refused and recorded nowhere."""

import json

import pytest

from tessera.train.checkpoints import CheckpointError
from tessera.train.metrics import read_metrics
from tessera.train.trainer import train

from .helpers import tiny_config


def config(extra):
    cfg = tiny_config(f"checkpoint.every=2,{extra}")
    cfg.train.progress = True  # the notes are console lines
    return cfg


def test_finished_rerun_changed_config_and_history(tmp_path, capsys):
    workdir = str(tmp_path)
    train(config("train.steps=2,optim.learning_rate=0.003"), workdir)
    configs = tmp_path / "configs"
    assert sorted(p.name for p in configs.iterdir()) == ["config-0.json"]
    capsys.readouterr()

    again = train(config("train.steps=2,optim.learning_rate=0.003"), workdir)
    assert capsys.readouterr().out == "tessera: already finished at step 2; nothing to do\n"
    assert again.step == 2 and again.losses == {} and not again.interrupted
    assert [r["step"] for r in read_metrics(workdir, "train")] == [1, 2]  # untouched
    assert sorted(p.name for p in configs.iterdir()) == ["config-0.json"]

    more = train(config("train.steps=3,optim.learning_rate=0.001"), workdir)
    out = capsys.readouterr().out
    assert ("tessera: resuming with changed config: optim.learning_rate 0.003 -> 0.001, "
            "train.steps 2 -> 3\n") in out
    assert more.resumed_from == 2 and list(more.losses) == [3]
    assert sorted(p.name for p in configs.iterdir()) == ["config-0.json", "config-2.json"]
    first, second = (json.loads((configs / f"config-{s}.json").read_text()) for s in (0, 2))
    assert (first["train"]["steps"], second["train"]["steps"]) == (2, 3)
    assert (first["optim"]["learning_rate"], second["optim"]["learning_rate"]) == (0.003, 0.001)
    assert json.loads((tmp_path / "config.json").read_text()) == second

    with pytest.raises(CheckpointError):
        train(config("train.steps=4,model.d_model=48"), workdir)
    assert sorted(p.name for p in configs.iterdir()) == ["config-0.json", "config-2.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == second
