"""``python -m tessera.train``: a short run end to end, and one-line errors for bad input."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from tessera.cli import check_workdir
from tessera.configs import config_names, load_config
from tessera.train.metrics import read_metrics
from tessera.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = ["--config.train.tensorboard=False"]


def run_train(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "tessera.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_trains_and_writes_metrics(tmp_path):
    proc = run_train("--config=llama:tiny", f"--workdir={tmp_path}", "--config.train.steps=4",
                     "--config.train.log_every=2", *QUIET)
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in rows] == [1, 2, 4]
    assert all({"loss", "nll", "accuracy", "learning_rate", "grad_norm"} <= set(r) for r in rows)
    assert {"tokens_per_s", "tflops_per_device", "mfu"} <= set(rows[-1])
    assert all(0.5 < r["packing"] <= 1 for r in rows)  # real tokens / slots of the packed rows
    [evaluation] = read_metrics(str(tmp_path), "eval")  # at the end (eval.every=100)
    assert evaluation["step"] == 4 and {"eval/loss", "eval/perplexity"} <= set(evaluation)
    assert "eval/loss" in proc.stdout and "unigram entropy" in proc.stdout
    assert (tmp_path / "checkpoints" / "4").is_dir()
    assert json.load(open(tmp_path / "config.json"))["model"]["family"] == "llama"


@pytest.mark.parametrize("args, message", [
    (["--config.model.num_layer=3"], "unknown config key 'model.num_layer'"),
    (["--config.mesh.data=3"], "multiply to 3, but there are 1 devices"),
    (["--config.data.source=text", "--config.data.path={empty}"], "contains no documents"),
    (["--config.data.source=text", "--config.data.path={missing}"], "missing.txt"),
    (["--config.model.vocab_size=100"],
     "tokenizer 'byte' has 259 ids but model.vocab_size is 100: raise model.vocab_size"),
    (["--config=llama:huge"], "unknown preset 'huge'"),
    (["--config.train.task=nope"],
     r"unknown task 'nope'; known: \['classify', 'diffusion', 'lm', "),
    (["--config=classify:tiny", "--config.model.num_classes=0"],
     "task classify needs model.num_classes > 0"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [a.format(empty=empty, missing=tmp_path / "missing.txt") for a in args]
    config = [a for a in args if a.startswith("--config=")] or ["--config=llama:tiny"]
    rest = [a for a in args if not a.startswith("--config=")]
    proc = run_train(*config, f"--workdir={tmp_path / 'w'}", "--config.train.steps=2", *rest)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tessera: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(message, errors[0]), errors[0]


@pytest.mark.parametrize("module, args, message", [
    ("tessera.train", ["--config={tmp}/bad.py"], "config file {tmp}/bad.py, line 1: expected ':'"),
    ("tessera.train", ["--config=llama:huge"], "unknown preset 'huge'"),
    ("tessera.train", ["--config.model.d_model=abc"], "model.d_model: 'abc' is not an int"),
    ("tessera.train", ["--config=llama:tiny,train.step=5"], "unknown config key 'train.step'"),
    ("tessera.train", ["--workdir={tmp}/file"], "workdir {tmp}/file is not a directory"),
    ("tessera.train", ["--workdir={tmp}/file/w"], "cannot create workdir {tmp}/file/w: Not a dir"),
    ("tessera.serve.decode", ["--config.model.d_model=abc"], "model.d_model: 'abc' is not an"),
    ("tessera.serve.decode", ["--workdir={tmp}/file"], "workdir {tmp}/file is not a directory"),
    ("tessera.serve.decode", ["--workdir={tmp}/none"], "workdir {tmp}/none does not exist"),
])
def test_config_and_workdir_mistakes_are_one_line(tmp_path, module, args, message):
    (tmp_path / "bad.py").write_text("def get_config(arg=None)\n")
    (tmp_path / "file").write_text("")
    args = [a.format(tmp=tmp_path) for a in ["--config=llama:tiny", f"--workdir={tmp_path}/w",
                                             "--prompt=1+1=", *args]]
    if module == "tessera.train":
        args.remove("--prompt=1+1=")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()  # one line: no traceback, no log
    assert line.startswith("tessera: error: ") and message.format(tmp=tmp_path) in line, line


def test_unwritable_workdir(tmp_path, monkeypatch):
    workdir = tmp_path / "ro"
    workdir.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anyway: make access() answer as for a read-only mount
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=f"^workdir {workdir} is not writable$"):
        check_workdir(str(workdir), write=True)
    check_workdir(str(workdir), write=False)  # decode only reads


@pytest.mark.parametrize("name", config_names())
@pytest.mark.slow
def test_every_config_runs_one_step_at_tiny(name, tmp_path):
    # A small batch and one eval batch: the step and the eval at the end still compile and run
    # at the preset's shapes (the pixel U-Net's batch of 64 at 32 x 32 took minutes on CPU).
    cfg = load_config(f"{name}:tiny,train.steps=1,train.progress=False,train.tensorboard=False,"
                      "data.global_batch_size=8,eval.batches=1")
    result = train(cfg, str(tmp_path), devices=jax.devices()[:1])
    assert result.step == 1 and math.isfinite(result.losses[1]), result.losses
    if cfg.train.task in ("lm", "classify"):
        # At init a model guesses near-uniformly: the first loss is near ln(number of outputs).
        outputs = cfg.model.num_classes or cfg.model.vocab_size
        assert result.losses[1] == pytest.approx(math.log(outputs), rel=0.1), result.losses
