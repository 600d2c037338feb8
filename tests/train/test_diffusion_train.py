"""The ``diffusion`` and ``vae`` tasks through the Trainer: one DiT step is the same on an
8-device mesh (fsdp=4, data=2) as on one device (the VAE's and U-Net's sharded loss and gradients
are checked at model level in tests/models, where a conv train step's CPU compile costs less);
the denoiser learns the latents of a trained VAE workdir; bad settings fail before training."""

import jax
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.data import make_image_pipeline
from tessera.train.trainer import Trainer, train

from .helpers import QUIET, one_step
from .test_sharded_step import assert_same_update

SMALL = f"data.global_batch_size=8,checkpoint.async_save=False,eval.every=0,{QUIET}"
# The presets at 16 x 16, the VAE at two levels, the DiT at two layers: the steps compile in
# seconds.
CONFIGS = {
    "vae": "vae:tiny,model.image_size=16,model.vae.block_out_channels=(16, 32)",
    "dit": "ldm:tiny_dit,model.image_size=16,model.num_layers=2",
}


def small(spec: str, extra: str = "", **mesh):
    cfg = load_config(f"{spec},{SMALL}{',' + extra if extra else ''}")
    cfg.mesh.update(data=1)
    cfg.mesh.update(**mesh)
    return cfg


def test_sharded_step_matches_single_device(tmp_path):
    spec = CONFIGS["dit"]
    _, init_1, params_1, m_1 = one_step(small(spec), tmp_path / "one", jax.devices()[:1])
    trainer, init_n, params_n, m_n = one_step(small(spec, fsdp=4, data=2), tmp_path / "eight")
    assert trainer.mesh.devices.size == 8
    sharded = [p for p in jax.tree.leaves(trainer.state_shardings["params"])
               if any(trainer.mesh.shape[a] > 1 for axes in p.spec if axes
                      for a in ((axes,) if isinstance(axes, str) else axes))]
    assert sharded, "no parameter is sharded over the mesh"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), init_1, init_n)
    np.testing.assert_allclose(m_n["loss"], m_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_n["grad_norm"], m_1["grad_norm"], rtol=1e-4)
    assert_same_update(init_1, params_1, params_n)


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vae")
    cfg = small(CONFIGS["vae"], "train.steps=1")  # 16 x 16 pixels -> 8 x 8 latents
    train(cfg, str(workdir), devices=jax.devices()[:1])
    return str(workdir)


def test_denoiser_learns_the_vae_latents(vae_workdir, tmp_path):
    # The DiT denoiser (its train step compiles far faster on CPU than the U-Net's, whose
    # training the every-config CLI test runs).
    cfg = small("ldm:tiny_dit_latent,model.num_layers=2",
                f"model.diffusion.vae_workdir={vae_workdir},train.steps=1")
    trainer = Trainer(cfg, str(tmp_path), jax.devices()[:1])
    data = trainer.task.make_data("train")
    batch = next(data)
    assert batch["images"].shape == (8, 8, 8, 4) and batch["images"].dtype == np.float32
    # The pipeline's latents are the VAE's scaled posterior means of the images it read.
    pixels = next(make_image_pipeline(cfg.data, global_batch_size=8, image_size=16,
                                      num_classes=cfg.model.num_classes))
    vae = trainer.task.vae[1]
    want = np.asarray(jax.jit(vae.to_latents)(pixels["images"]))
    np.testing.assert_allclose(batch["images"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch["label"], pixels["label"])
    # Resuming the latent iterator gives the batches a fresh one gives.
    state = data.get_state()
    following = next(data)
    again = trainer.task.make_data("train")
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["images"], following["images"])
    result = train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert np.isfinite(result.losses[1])


@pytest.mark.parametrize(
    "extra, message",
    [
        ("model.num_classes=0", "task diffusion trains class-conditional denoisers"),
        ("model.name=vit", "task diffusion needs a denoiser"),
        ("data.source=synthetic", "task diffusion reads images"),
        ("model.diffusion.cond_dropout=1.0", r"cond_dropout must be in \[0, 1\)"),
        ("model.diffusion.vae_workdir=/nonexistent", "has no config.json"),
        ("model.num_channels=4", "without model.diffusion.vae_workdir the denoiser learns RGB"),
    ],
)
def test_bad_settings_fail_with_one_line(extra, message, tmp_path):
    cfg = small("ldm:tiny", extra)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        trainer = Trainer(cfg, str(tmp_path), jax.devices()[:1])
        trainer.task.make_data("train")
