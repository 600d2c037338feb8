"""ViT through the one Trainer: ``classify`` on the embedded shapes images (dropout and stochastic
depth from the step RNG, exact resume, images/s and MFU logged), label smoothing and top-5
accuracy, and ``python -m tessera.serve.classify`` on the trained workdir."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tessera.configs import load_config
from tessera.data import SHAPE_CLASSES, ShapesSource
from tessera.serve.labels import class_names, top_k
from tessera.train.metrics import read_metrics
from tessera.train.tasks.classify import softmax_cross_entropy
from tessera.train.trainer import Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE = jax.devices()[:1]
# A small vit:tiny (16 px images, 1 layer of width 32) with training noise on, so that the step
# RNG matters for resume.
SMALL = (
    "model.image_size=16,model.d_model=32,model.num_layers=1,model.num_heads=2,"
    "model.num_kv_heads=2,model.head_dim=16,model.mlp_dim=64,model.dropout=0.1,"
    "model.stochastic_depth=0.1,data.global_batch_size=8,checkpoint.async_save=False,"
    "train.progress=False,train.tensorboard=False,train.label_smoothing=0.1,"
    "train.steps=6,train.log_every=1,eval.every=3,eval.batches=2,checkpoint.every=3"
)


def config(extra=""):
    return load_config(f"vit:tiny,{SMALL}{',' + extra if extra else ''}")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vit"))
    return workdir, train(config(), workdir, devices=ONE)


@pytest.mark.slow
def test_trains_and_logs_image_metrics(full):
    workdir, result = full
    rows = read_metrics(workdir, "train")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all({"loss", "nll", "accuracy", "top5_accuracy", "grad_norm"} <= set(r) for r in rows)
    assert {"images_per_s", "tflops_per_device", "mfu"} <= set(rows[-1])
    evals = read_metrics(workdir, "eval")
    assert [r["step"] for r in evals] == [3, 6]
    assert set(evals[-1]) == {"step", "eval/loss", "eval/nll", "eval/accuracy",
                              "eval/top5_accuracy"}
    # Six classes: top-5 misses only rows whose true class scores last.
    assert all(r["top5_accuracy"] >= r["accuracy"] for r in rows)


@pytest.mark.slow
def test_resume_after_kill_is_exact(full, tmp_path):
    """Dropout and stochastic depth draw from the step RNG and the image stream resumes at its
    position, so an interrupted run's losses equal the uninterrupted one's."""
    _, result = full

    def kill_at_4(step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    workdir = str(tmp_path)
    first = train(config(), workdir, devices=ONE, on_step=kill_at_4)
    second = train(config(), workdir, devices=ONE)
    assert first.interrupted and second.resumed_from == 4  # SIGTERM saves the step it stops at
    for step in range(1, 7):
        run = first if step <= 4 else second
        assert run.losses[step] == pytest.approx(result.losses[step], rel=1e-6)
    assert second.evals[6] == pytest.approx(result.evals[6], rel=1e-6)


def test_label_smoothing_and_top5():
    logits = jnp.array([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0],
                        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    labels = jnp.array([0, 1, -1])  # the last row is padding
    total, weight, sums = softmax_cross_entropy(logits, labels, 0.2)
    logp = jax.nn.log_softmax(logits[:2])
    nll = -logp[jnp.arange(2), labels[:2]]
    smoothed = 0.8 * nll - 0.2 * logp.mean(-1)
    assert float(weight) == 2
    np.testing.assert_allclose(total, smoothed.sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["nll"], nll.sum(), rtol=1e-6)
    assert float(sums["accuracy"]) == 1  # row 0 right, row 1 wrong (class 6 scores highest)
    assert float(sums["top5_accuracy"]) == 1  # row 1's class 1 is sixth of seven
    _, _, plain = softmax_cross_entropy(logits, labels)
    assert "nll" not in plain  # without smoothing the loss is the nll


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train.label_smoothing must be in \[0, 1\)"):
        Trainer(config("train.label_smoothing=1.0"), str(tmp_path), ONE)
    with pytest.raises(ValueError, match="needs an image model"):
        Trainer(load_config("classify:tiny,data.source=shapes"), str(tmp_path), ONE)
    with pytest.raises(ValueError, match="image_size=30 is not divisible by model.patch_size=8"):
        Trainer(config("model.image_size=30"), str(tmp_path), ONE)
    trainer = Trainer(config("model.num_classes=4,model.class_names=()"), str(tmp_path), ONE)
    with pytest.raises(ValueError, match="num_classes=4 is fewer than the 6 classes"):
        trainer.task.make_data("train")


def test_class_names_and_top_k():
    assert class_names(config()) == SHAPE_CLASSES
    cfg = config("model.num_classes=8")
    names = class_names(cfg)
    assert len(names) == 8 and names[-1] == "class_7"
    probs = np.array([[0.1, 0.6, 0.3]])
    assert top_k(probs, ("a", "b", "c"), 2) == [[("b", 0.6), ("c", 0.3)]]


def _classify(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "tessera.serve.classify", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_classify_cli(full, tmp_path):
    workdir, _ = full
    source = ShapesSource(0, "eval", 24)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(source[i]["image"]).save(path)  # 24 px: resized to 16 like the pipeline
        paths.append(str(path))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    spec = f"--config=vit:tiny,{SMALL}"
    proc = _classify(spec, f"--workdir={workdir}", f"--images={','.join(paths)}", "--top_k=2",
                     "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == paths
    for row in rows:
        assert len(row["top_k"]) == 2 and {t["label"] for t in row["top_k"]} <= set(
            class_names(config()))
        assert row["top_k"][0]["p"] >= row["top_k"][1]["p"]
    proc = _classify(spec, f"--workdir={workdir}", f"--images={paths[0]},{bad}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("tessera: error:")
    assert "bad.png" in proc.stderr
