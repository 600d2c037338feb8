"""``python -m tessera.serve.sample``: images from a trained denoiser, as a user runs it; and
``generate``, the library call under it (seeded, batching-independent, guided)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tessera.configs import load_config
from tessera.serve.images import generate, image_grid, load_denoiser
from tessera.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A 2-layer pixel DiT on 16 x 16 images; two train steps (an EMA is kept).
SPEC = ("ldm:tiny_dit,model.image_size=16,model.num_layers=2,data.global_batch_size=8,"
        "train.steps=2,eval.every=0,checkpoint.async_save=False,train.progress=False,"
        "train.tensorboard=False")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dit"))
    train(load_config(SPEC), path, devices=jax.devices()[:1])
    return path


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "tessera.serve.sample", f"--config={SPEC}", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )


def test_cli_writes_the_grid_and_a_seed_repeats_it(workdir, tmp_path):
    out = tmp_path / "grid.png"
    proc = _cli(f"--workdir={workdir}", f"--output={out}", "--num_images=5", "--steps=3",
                "--guidance=2.0", "--scale=1", "--seed=4")
    assert proc.returncode == 0, proc.stderr
    assert "from step 2" in proc.stderr and "(EMA weights)" in proc.stderr
    assert f"wrote 5 images (16x16) to {out}" in proc.stdout
    grid = np.asarray(Image.open(out))
    assert grid.shape == image_grid(np.zeros((5, 16, 16, 3), np.uint8)).shape
    # The library call with the same settings gives the same pixels.
    denoiser = load_denoiser(load_config(SPEC), workdir)
    images = generate(denoiser, [0, 1, 2, 3, 4], sampler="ddim", steps=3, guidance=2.0, seed=4)
    np.testing.assert_array_equal(grid, image_grid(images))


def test_generate_is_seeded_and_independent_of_batching(workdir):
    denoiser = load_denoiser(load_config(SPEC), workdir)
    kw = dict(sampler="dpmpp_2m", steps=3, guidance=1.5)
    one = generate(denoiser, [1, 2, 3], seed=0, **kw)
    np.testing.assert_array_equal(one, generate(denoiser, [1, 2, 3], seed=0, batch_size=2, **kw))
    assert not np.array_equal(one, generate(denoiser, [1, 2, 3], seed=1, **kw))
    # Stochastic samplers are seeded too.
    ddpm = dict(sampler="ddpm", steps=3)
    np.testing.assert_array_equal(generate(denoiser, [0], seed=5, **ddpm),
                                  generate(denoiser, [0], seed=5, **ddpm))
    assert denoiser.ema and denoiser.step == 2
    raw = load_denoiser(load_config(SPEC), workdir, ema=False)
    assert not raw.ema and not np.array_equal(generate(raw, [1, 2, 3], seed=0, **kw), one)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampler=plms"], "unknown sampler 'plms'"),
        (["--steps=0"], "steps must be in [1, num_train_timesteps=1000]"),
        (["--class_label=6"], "class label 6 is not a class of this model"),
        (["--eta=0.5"], "eta (DDIM's noise scale) is for sampler ddim"),
        (["--output=grid.jpg"], "must name a .png file"),
    ],
)
def test_cli_bad_input_is_one_line(workdir, tmp_path, args, message):
    output = [] if any(a.startswith("--output") for a in args) else [f"--output={tmp_path}/g.png"]
    proc = _cli(f"--workdir={workdir}", *output, "--sampler=ddim" if "--eta=0.5" not in args
                else "--sampler=euler", *args)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("tessera: error: ") and message in line, line
    assert not os.path.exists(tmp_path / "g.png")
