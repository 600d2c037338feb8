"""Samplers with the exact denoiser of Gaussian data, guidance, and the API's errors.

Data x0 ~ N(MU, S^2) independently per dimension. At x_t = alpha * x0 + sigma * eps both posterior
means are linear in x_t (v = alpha^2 S^2 + sigma^2):

  E[x0 | x_t] = MU + alpha S^2 / v * (x_t - alpha MU), E[eps | x_t] = sigma / v * (x_t - alpha MU)

so the exact model of every prediction type is known, and a sampler driven by it should draw
N(MU, S^2) up to its discretisation error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.models.schedule import PREDICTIONS, NoiseSchedule
from tessera.serve import samplers

MU = np.array([0.5, -1.0, 2.0, 0.0], np.float32).reshape(2, 2, 1)  # [H, W, C]
S = np.array([0.3, 1.0, 0.5, 2.0], np.float32).reshape(2, 2, 1)


def cosine(prediction: str = "epsilon") -> NoiseSchedule:
    return NoiseSchedule.build("cosine", prediction=prediction)


def ve_sigmas(schedule: NoiseSchedule) -> jax.Array:
    ac = schedule.alphas_cumprod
    return jnp.asarray(np.sqrt((1 - ac) / ac), jnp.float32)


def posterior(ve_table, x_t, t):
    """(E[x0 | x_t], E[eps | x_t], alpha, sigma) at timesteps t [B], fractional ones (Euler's) at
    the sigma interpolated as the sampler does."""
    grid = jnp.arange(ve_table.shape[0], dtype=jnp.float32)
    ve = jnp.interp(t, grid, ve_table)[:, None, None, None]
    alpha = 1 / jnp.sqrt(1 + ve**2)
    sigma = ve * alpha
    d = x_t - alpha * MU
    v = alpha**2 * S**2 + sigma**2
    return MU + alpha * S**2 / v * d, sigma / v * d, alpha, sigma


def _exact(ve_table, prediction, x_t, t):
    x0, eps, alpha, sigma = posterior(ve_table, x_t, t)
    return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction]


def exact_model(schedule: NoiseSchedule):
    """model_fn(x_t, t) -> the exact denoiser's output for the schedule's prediction type (a
    pytree: the tests share one compiled step per prediction type, sampler and shape)."""
    return jax.tree_util.Partial(_exact, ve_sigmas(schedule), schedule.prediction)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_to_x0_eps_of_exact_model_is_posterior_mean(prediction):
    schedule = cosine(prediction)
    t = jnp.array([0, 10, 500, 900])
    x0 = MU + S * np.random.default_rng(0).normal(size=(4, *MU.shape))
    x_t = schedule.add_noise(jnp.asarray(x0, jnp.float32), jnp.ones_like(x0), t)
    x0_hat, eps_hat = schedule.to_x0_eps(exact_model(schedule)(x_t, t.astype(jnp.float32)), x_t, t)
    x0_want, eps_want, _, _ = posterior(ve_sigmas(schedule), x_t, t.astype(jnp.float32))
    np.testing.assert_allclose(x0_hat, x0_want, atol=2e-5)
    np.testing.assert_allclose(eps_hat, eps_want, atol=2e-5)


N = 16384  # samples per dimension: 1 sigma of the mean S / 128, of the std 0.55 %


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.key(0), (N, *MU.shape))


@pytest.mark.parametrize(
    "sampler,steps", [("ddim", 100), ("euler", 100), ("dpmpp_2m", 25), ("ddpm", 250)]
)
def test_samples_match_the_data(x_T, sampler, steps):
    """Cosine schedule, N = 16384: |mean - MU| <= 0.05 S and |std / S - 1| <= 0.04 in every
    dimension (observed at most 0.035 S, ddim's: its "leading" timesteps start at 990, where
    x_T ~ N(0, 1) misses the marginal's mean alpha MU = 0.016 MU; and 0.025)."""
    schedule = cosine()
    x = samplers.sample(
        exact_model(schedule),
        x_T,
        jax.random.key(1),
        schedule=schedule,
        sampler=sampler,
        steps=steps,
    )
    x = np.asarray(x)
    assert np.all(np.abs(x.mean(0) - MU) <= 0.05 * S), (x.mean(0) - MU) / S
    assert np.all(np.abs(x.std(0) / S - 1) <= 0.04), x.std(0) / S - 1


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler"])
def test_prediction_types_agree(x_T, sampler):
    """The exact model's x0 and eps are the same whatever it predicts: so are the samples. (Linear
    schedule: at t = 999 of the cosine one alpha is 5e-5, and x0 from eps loses 3 digits.)"""
    out = []
    for prediction in PREDICTIONS:
        schedule = NoiseSchedule.build("linear", prediction=prediction)
        model_fn = exact_model(schedule)
        out.append(
            samplers.sample(model_fn, x_T[:256], None, schedule=schedule, sampler=sampler, steps=10)
        )
    for x in out[1:]:
        np.testing.assert_allclose(x, out[0], atol=1e-4)


def test_same_seed_same_samples(x_T):
    schedule, model_fn = cosine(), exact_model(cosine())
    run = lambda sampler, rng, **kw: np.asarray(
        samplers.sample(model_fn, x_T[:64], rng, schedule=schedule, sampler=sampler, steps=5, **kw)
    )
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        np.testing.assert_array_equal(run(sampler, None), run(sampler, None))
    for sampler, kw in (("ddpm", {}), ("ddim", {"eta": 0.5})):
        a, b = run(sampler, jax.random.key(3), **kw), run(sampler, jax.random.key(3), **kw)
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, run(sampler, jax.random.key(4), **kw))


def test_progress_and_noises():
    schedule, model_fn = cosine(), exact_model(cosine())
    x_T = jax.random.normal(jax.random.key(0), (2, *MU.shape))
    seen = []
    kw = dict(schedule=schedule, sampler="ddpm", steps=4)
    noises = jax.random.normal(jax.random.key(5), (4, *x_T.shape))
    a = samplers.sample(
        model_fn, x_T, None, noises=noises, progress=lambda *a: seen.append(a), **kw
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    np.testing.assert_array_equal(a, samplers.sample(model_fn, x_T, None, noises=noises, **kw))
    with pytest.raises(ValueError, match="noises must be"):
        samplers.sample(model_fn, x_T, None, noises=noises[:3], **kw)


def test_pytree_model_fn_traces_once():
    """A Partial's array leaves are traced arguments: new values, no new trace."""
    traces = []

    def apply(w, x, t):
        traces.append(x.shape)
        return w * x

    schedule = cosine()
    x_T = jnp.ones((2, *MU.shape))
    kw = dict(schedule=schedule, sampler="euler", steps=3)
    a = samplers.sample(jax.tree_util.Partial(apply, jnp.float32(0.1)), x_T, None, **kw)
    b = samplers.sample(jax.tree_util.Partial(apply, jnp.float32(0.2)), x_T, None, **kw)
    assert len(traces) == 1 and not np.allclose(a, b)


def test_classifier_free_guidance():
    batches = []

    def apply(x, t, labels):
        batches.append(x.shape[0])
        return x * (1.0 + labels.astype(jnp.float32))[:, None, None, None] + t[:, None, None, None]

    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    t = jnp.full((3,), 7.0)
    labels = jnp.array([0, 1, 2])
    cond, uncond = apply(x, t, labels), apply(x, t, jnp.full((3,), 5))
    batches.clear()
    np.testing.assert_array_equal(
        samplers.classifier_free_guidance(apply, labels, 5, 1.0)(x, t), cond
    )
    assert batches == [3]  # scale 1: the conditional model alone
    guided = samplers.classifier_free_guidance(apply, labels, 5, 4.0)(x, t)
    np.testing.assert_allclose(guided, uncond + 4.0 * (cond - uncond), rtol=1e-6)
    assert batches == [3, 6]  # both halves in one batch

    def apply_context(x, t, context):  # context [B, L, D] with a null context [L, D]
        return x + context.sum((1, 2))[:, None, None, None]

    context, null = jnp.ones((3, 2, 4)), jnp.zeros((2, 4))
    guided = samplers.classifier_free_guidance(apply_context, context, null, 2.0)(x, t)
    np.testing.assert_allclose(guided, x + 2.0 * 8.0, rtol=1e-6)


def test_guidance_scale_one_is_no_guidance():
    schedule = cosine()
    exact = exact_model(schedule)
    apply = lambda x, t, labels: exact(x, t) * (1.0 + 0.1 * labels[:, None, None, None])
    x_T = jax.random.normal(jax.random.key(0), (4, *MU.shape))
    labels = jnp.array([0.0, 1.0, 2.0, 3.0])
    kw = dict(schedule=schedule, sampler="dpmpp_2m", steps=5)
    guided = samplers.classifier_free_guidance(apply, labels, 0.0, 1.0)
    plain = lambda x, t: apply(x, t, labels)
    np.testing.assert_array_equal(
        samplers.sample(guided, x_T, None, **kw), samplers.sample(plain, x_T, None, **kw)
    )


def test_errors():
    schedule, model_fn = cosine(), exact_model(cosine())
    x_T = jnp.zeros((1, *MU.shape))
    run = lambda **kw: samplers.sample(model_fn, x_T, None, schedule=schedule, **kw)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        run(sampler="heun", steps=10)
    for steps in (0, 1001):
        with pytest.raises(ValueError, match=r"steps must be in \[1, num_train_timesteps=1000\]"):
            run(sampler="ddim", steps=steps)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        run(sampler="ddim", steps=10, eta=-0.1)
    with pytest.raises(ValueError, match="eta .* is for sampler ddim, not 'euler'"):
        run(sampler="euler", steps=10, eta=0.5)
    with pytest.raises(ValueError, match="sampler ddpm adds noise: pass rng"):
        run(sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match="dpmpp_2m with 1000 steps repeats timesteps"):
        samplers.make_plan(schedule, "dpmpp_2m", 1000)
    offset = NoiseSchedule.build("linear", steps_offset=1)
    with pytest.raises(ValueError, match="start at timestep 1000 >= num_train_timesteps=1000"):
        samplers.make_plan(offset, "ddim", 1000)
