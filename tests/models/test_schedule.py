"""NoiseSchedule: betas and alphas_cumprod against diffusers, the forward process and the targets
of each prediction type (golden: tools/make_diffusers_golden.py, fixture ``schedulers``)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tessera.configs.base import base_config
from tessera.models.schedule import PREDICTIONS, NoiseSchedule

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "diffusers", "schedulers")
# The golden's schedule configs by the name tessera gives the beta schedule.
BY_SCHEDULE = {"linear": "default", "scaled_linear": "sd_v", "cosine": "cosine_x0"}


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(FIXTURE, "reference.npz"))


def golden_schedule(ref, name: str) -> NoiseSchedule:
    return NoiseSchedule.build(**json.loads(str(ref["configs"]))[name])


@pytest.mark.parametrize("schedule", list(BY_SCHEDULE))
def test_betas_and_alphas_cumprod_match_diffusers(ref, schedule):
    """float64 here, float32 (torch.linspace, torch.cumprod) in diffusers: the cumulative
    product's rounding reaches 1.3e-5 relative at t = 999 of the cosine schedule."""
    sched = golden_schedule(ref, BY_SCHEDULE[schedule])
    np.testing.assert_allclose(sched.betas, ref[f"betas.{schedule}"], rtol=5e-7)
    np.testing.assert_allclose(sched.alphas_cumprod, ref[f"alphas_cumprod.{schedule}"], rtol=3e-5)


def test_add_noise_and_velocity_match_diffusers(ref):
    sched = golden_schedule(ref, "sd_v")
    x0, eps, t = (jnp.asarray(ref[k]) for k in ("noise.x0", "noise.eps", "noise.t"))
    np.testing.assert_allclose(sched.add_noise(x0, eps, t), ref["noise.x_t"], atol=2e-6)
    assert sched.prediction == "v_prediction"
    np.testing.assert_allclose(sched.target(x0, eps, t), ref["noise.v"], atol=2e-6)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_and_back(prediction):
    """to_x0_eps(target) recovers (x0, noise) at x_t = add_noise(x0, noise, t)."""
    sched = NoiseSchedule.build("scaled_linear", 1000, 0.00085, 0.012, prediction)
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 4, 3, 3, 2)).astype(np.float32)
    t = jnp.array([0, 1, 500, 999])
    x_t = sched.add_noise(x0, noise, t)
    target = sched.target(x0, noise, t)
    expected = {"epsilon": noise, "sample": x0}.get(prediction)
    if expected is not None:
        np.testing.assert_array_equal(target, expected)
    x0_hat, eps_hat = sched.to_x0_eps(target, x_t, t)
    # x0 from eps at t = 999 divides by alpha = 0.068: float32 rounding of x_t grows 15x.
    np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
    np.testing.assert_allclose(eps_hat, noise, atol=1e-5)


def test_snr_and_dtype():
    sched = NoiseSchedule.build("linear")
    t = jnp.array([0, 999])
    ac = sched.alphas_cumprod[[0, 999]]
    np.testing.assert_allclose(sched.snr(t), ac / (1 - ac), rtol=1e-6)
    x0 = jnp.ones((2, 2, 2, 1), jnp.bfloat16)
    assert sched.add_noise(x0, jnp.zeros_like(x0), t).dtype == jnp.bfloat16


def test_from_config():
    cfg = base_config()
    cfg.model.diffusion.update(schedule="cosine", prediction="v_prediction", num_train_timesteps=50)
    sched = NoiseSchedule.from_config(cfg.model.diffusion)
    assert (sched.num_train_timesteps, sched.prediction) == (50, "v_prediction")
    assert (sched.clip_sample, sched.steps_offset, sched.set_alpha_to_one) == (False, 0, True)
    np.testing.assert_allclose(sched.betas, NoiseSchedule.build("cosine", 50).betas)
    assert sched.betas.max() <= 0.999


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown noise schedule 'squaredcos'"):
        NoiseSchedule.build("squaredcos")
    with pytest.raises(ValueError, match="unknown prediction type 'eps'"):
        NoiseSchedule.build("linear", prediction="eps")
