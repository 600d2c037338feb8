"""Diffusion samplers (DDPM, DDIM, DPM-Solver++(2M), Euler) that step as diffusers' schedulers do.

Every sampler here is one linear update per step. With ``x`` the sampler's state, the model sees
``x_in = cin * x`` at timestep ``t``; its output gives ``(x0, eps)`` through the schedule's
prediction type at the step's ``(alpha, sigma)``; then

    x <- cx * x + c0 * x0 + ce * eps + c1 * (x0 - x0_prev) + std * noise

where ``x0_prev`` is the previous step's x0 (DPM-Solver++'s second-order term). The samplers
differ only in their per-step coefficients, computed on the host in float64 (``make_plan``), so
one jitted step serves a whole loop (one compile per sampler and shape) and reads step ``i``'s
coefficients from tables passed as arguments.

Timesteps and coefficients match diffusers' scheduler classes with their default configs:

  ddpm      DDPMScheduler: "leading" spacing (``arange(steps) * (T // steps)``, reversed, plus
            ``schedule.steps_offset``), posterior mean of q(x_prev | x_t, x0), "fixed_small"
            variance noise on every step with t > 0; x0 clipped if ``schedule.clip_sample``.
  ddim      DDIMScheduler: "leading" spacing plus steps_offset, previous timestep ``t - T //
            steps``, the last step to alpha_cumprod 1 (``set_alpha_to_one``) or
            alphas_cumprod[0]; ``eta`` in [0, 1] scales its noise (0: deterministic).
  dpmpp_2m  DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint): "linspace" spacing
            (``linspace(0, T - 1, steps + 1)`` rounded, reversed, last dropped), first order on
            the first and the last step (lower_order_final; the final sigma is zero).
  euler     EulerDiscreteScheduler (no churn): "linspace" spacing (fractional timesteps),
            sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod) interpolated linearly in t. Its
            state lives in sigma space: x_T is scaled by the largest sigma, the model input by
            ``1 / sqrt(sigma^2 + 1)`` (diffusers' ``scale_model_input``), inside this module.

Stable Diffusion's scheduler configs set ``steps_offset=1`` and ``set_alpha_to_one=False`` (and
no clipping): the schedule's fields of those names (config.model.diffusion) select them.

``model_fn(x [B, ...], t [B] float32) -> output [B, ...]`` is traced inside the jitted step. A
plain closure over parameters would bake them into the program as constants; a pytree callable
passes its array leaves as arguments instead, so new parameter values do not recompile: e.g.
``jax.tree_util.Partial(lambda state, x, t: nnx.merge(graphdef, state)(x, t), state)`` for an NNX
model split into ``graphdef, state``, or what ``classifier_free_guidance`` returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tessera.models.schedule import NoiseSchedule, x0_eps_from

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class Coefficients(NamedTuple):
    """Per-step tables, each float32 [steps] (see the module docstring for the update)."""

    t: np.ndarray  # the timestep the model sees
    cin: np.ndarray  # model input scale
    alpha: np.ndarray  # x_in = alpha * x0 + sigma * eps
    sigma: np.ndarray
    cx: np.ndarray
    c0: np.ndarray
    ce: np.ndarray
    c1: np.ndarray
    std: np.ndarray  # noise scale (0: deterministic step)


class Plan(NamedTuple):
    """A sampler's whole loop, computed on the host before any device work."""

    sampler: str
    coefs: Coefficients
    init_sigma: float  # x = x_T * init_sigma before the first step
    prediction: str
    clip: bool  # clip x0 to [-1, 1]
    stochastic: bool  # some step adds noise

    @property
    def timesteps(self) -> np.ndarray:
        return self.coefs.t

    @property
    def steps(self) -> int:
        return len(self.coefs.t)


def _leading(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """diffusers' "leading" timesteps (ddpm, ddim), int64 [steps], descending."""
    T = schedule.num_train_timesteps
    ts = np.arange(steps)[::-1] * (T // steps) + schedule.steps_offset
    if ts[0] >= T:
        raise ValueError(
            f"{steps} steps with steps_offset={schedule.steps_offset} start at timestep {ts[0]} "
            f">= num_train_timesteps={T}"
        )
    return ts


def _coefs(steps: int, **tables: Any) -> Coefficients:
    """Coefficients from the given tables; the rest are their defaults (cin, alpha 1; others 0)."""
    default = {
        k: np.ones(steps) if k in ("cin", "alpha") else np.zeros(steps)
        for k in Coefficients._fields
    }
    return Coefficients(**{k: np.asarray(v, np.float32) for k, v in (default | tables).items()})


def _ddpm(schedule: NoiseSchedule, steps: int, eta: float) -> tuple[Coefficients, float]:
    ac = schedule.alphas_cumprod
    ts = _leading(schedule, steps)
    a_t = ac[ts]
    a_prev = np.append(ac[ts[1:]], 1.0)
    beta = 1.0 - a_t / a_prev
    var = np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
    return _coefs(
        steps,
        t=ts,
        alpha=np.sqrt(a_t),
        sigma=np.sqrt(1.0 - a_t),
        c0=np.sqrt(a_prev) * beta / (1.0 - a_t),
        cx=np.sqrt(a_t / a_prev) * (1.0 - a_prev) / (1.0 - a_t),
        std=np.where(ts > 0, np.sqrt(var), 0.0),
    ), 1.0


def _ddim(schedule: NoiseSchedule, steps: int, eta: float) -> tuple[Coefficients, float]:
    ac = schedule.alphas_cumprod
    ts = _leading(schedule, steps)
    prev = ts - schedule.num_train_timesteps // steps
    final = 1.0 if schedule.set_alpha_to_one else ac[0]
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * np.sqrt(var)
    return _coefs(
        steps,
        t=ts,
        alpha=np.sqrt(a_t),
        sigma=np.sqrt(1.0 - a_t),
        c0=np.sqrt(a_prev),
        ce=np.sqrt(1.0 - a_prev - std**2),
        std=std,
    ), 1.0


def _ve_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod) [T]: x_t / alpha_t = x0 + sigma * eps."""
    ac = schedule.alphas_cumprod
    return np.sqrt((1.0 - ac) / ac)


def _dpmpp_2m(schedule: NoiseSchedule, steps: int, eta: float) -> tuple[Coefficients, float]:
    T = schedule.num_train_timesteps
    ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    ve = np.append(_ve_sigmas(schedule)[ts], 0.0)
    alpha = 1.0 / np.sqrt(ve**2 + 1.0)  # VP coefficients of step i (i = steps: the clean end)
    sigma = ve * alpha
    with np.errstate(divide="ignore", invalid="ignore"):  # the last step: sigma 0, h inf
        lam = np.log(alpha) - np.log(sigma)  # half the log-SNR
        h = lam[1:] - lam[:-1]
        c0 = -alpha[1:] * np.expm1(-h)
        r0 = np.ones(steps)
        r0[1:] = (lam[1:-1] - lam[:-2]) / h[1:]
        c1 = 0.5 * c0 / r0
    second = np.zeros(steps, bool)
    second[1:-1] = True  # first order on the first step and the last (lower_order_final)
    return _coefs(
        steps,
        t=ts,
        alpha=alpha[:-1],
        sigma=sigma[:-1],
        cx=sigma[1:] / sigma[:-1],
        c0=c0,
        c1=np.where(second, c1, 0.0),
    ), 1.0


def _euler(schedule: NoiseSchedule, steps: int, eta: float) -> tuple[Coefficients, float]:
    T = schedule.num_train_timesteps
    ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1]
    ve = np.append(np.interp(ts, np.arange(T), _ve_sigmas(schedule)), 0.0)
    cin = 1.0 / np.sqrt(ve[:-1] ** 2 + 1.0)
    ratio = ve[1:] / ve[:-1]
    return _coefs(
        steps, t=ts, cin=cin, alpha=cin, sigma=ve[:-1] * cin, cx=ratio, c0=1.0 - ratio
    ), float(ve[0])


_PLANS = {"ddpm": _ddpm, "ddim": _ddim, "dpmpp_2m": _dpmpp_2m, "euler": _euler}


def make_plan(schedule: NoiseSchedule, sampler: str, steps: int, eta: float = 0.0) -> Plan:
    """The timesteps and per-step coefficients of ``sampler`` over ``steps`` steps."""
    if sampler not in _PLANS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, num_train_timesteps={T}], got {steps}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta (DDIM's noise scale) is for sampler ddim, not {sampler!r}")
    coefs, init_sigma = _PLANS[sampler](schedule, steps, eta)
    if len(np.unique(coefs.t)) < steps:  # dpmpp_2m's rounded linspace near steps = T
        raise ValueError(f"{sampler} with {steps} steps repeats timesteps; use fewer steps")
    clip = schedule.clip_sample and sampler in ("ddpm", "ddim")
    stochastic = bool(np.any(coefs.std > 0))
    return Plan(sampler, coefs, init_sigma, schedule.prediction, clip, stochastic)


def _partition(fn: Any) -> tuple[list, tuple]:
    """Split a (pytree) callable into its array leaves, traced, and the rest, static."""
    leaves, treedef = jax.tree.flatten(fn)
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    dynamic = [leaf for leaf, a in zip(leaves, is_array) if a]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array))
    return dynamic, (treedef, static)


def _combine(dynamic: list, static: tuple) -> Any:
    treedef, leaves = static
    arrays = iter(dynamic)
    return treedef.unflatten([next(arrays) if leaf is None else leaf for leaf in leaves])


@functools.partial(jax.jit, static_argnames=("static", "prediction", "clip"))
def _step(dynamic, x, x0_prev, noise, coefs, i, *, static, prediction, clip):
    """One sampler step: (x [B, ...], x0_prev) -> (next x, this step's x0); float32."""
    model_fn = _combine(dynamic, static)
    c = jax.tree.map(lambda table: table[i], coefs)
    x_in = c.cin * x
    out = model_fn(x_in, jnp.full((x.shape[0],), c.t, jnp.float32))
    x0, eps = x0_eps_from(prediction, out, x_in, c.alpha, c.sigma)
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
    x = c.cx * x + c.c0 * x0 + c.ce * eps + c.c1 * (x0 - x0_prev) + c.std * noise
    return x, x0


def iterate(
    model_fn: ModelFn,
    x_T: jax.Array,
    rng: jax.Array | None,
    plan: Plan,
    *,
    noises: jax.Array | None = None,
) -> Iterator[jax.Array]:
    """Run ``plan`` from unit-Gaussian ``x_T`` [B, ...], yielding the sampler's state (float32
    [B, ...], Euler's in sigma space) after each step; the last is the sample x0.

    Stochastic steps draw ``normal(fold_in(rng, i))``; ``noises`` [steps, B, ...] replaces those
    draws (replaying a reference run; steps without noise ignore their entry).
    """
    if plan.stochastic and rng is None and noises is None:
        raise ValueError(f"sampler {plan.sampler} adds noise: pass rng (or noises)")
    if noises is not None and noises.shape != (plan.steps, *x_T.shape):
        want = (plan.steps, *x_T.shape)
        raise ValueError(f"noises must be [steps, *x_T.shape] = {want}, got {noises.shape}")
    dynamic, static = _partition(model_fn)
    x = jnp.asarray(x_T, jnp.float32) * plan.init_sigma
    x0 = jnp.zeros_like(x)
    zeros = jnp.zeros_like(x)
    coefs = jax.tree.map(jnp.asarray, plan.coefs)
    for i in range(plan.steps):
        if noises is not None:
            noise = jnp.asarray(noises[i], jnp.float32)
        elif plan.coefs.std[i] > 0:
            noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        else:
            noise = zeros
        x, x0 = _step(
            dynamic,
            x,
            x0,
            noise,
            coefs,
            jnp.int32(i),
            static=static,
            prediction=plan.prediction,
            clip=plan.clip,
        )
        yield x


def sample(
    model_fn: ModelFn,
    x_T: jax.Array,
    rng: jax.Array | None,
    *,
    schedule: NoiseSchedule,
    sampler: str,
    steps: int,
    eta: float = 0.0,
    progress: Callable[[int, int], Any] | None = None,
    noises: jax.Array | None = None,
) -> jax.Array:
    """Denoise unit-Gaussian ``x_T`` [B, ...] with ``sampler`` (``SAMPLERS``) in ``steps`` steps;
    returns x0, float32 [B, ...].

    ``rng``: key for the noise of ddpm and ddim with eta > 0 (None for deterministic samplers).
    ``progress(done, steps)`` is called after each step, once it has finished (a progress bar).
    ``noises``: see ``iterate``.
    """
    plan = make_plan(schedule, sampler, steps, eta)
    for i, x in enumerate(iterate(model_fn, x_T, rng, plan, noises=noises)):
        if progress is not None:
            x.block_until_ready()  # report a finished step, not a dispatched one
            progress(i + 1, plan.steps)
    return x


def _guided(apply, labels, null_label, scale, x, t):
    if scale == 1.0:
        return apply(x, t, labels)
    null = jnp.broadcast_to(jnp.asarray(null_label, labels.dtype), labels.shape)
    out = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(out, 2)
    return uncond + scale * (cond - uncond)


def classifier_free_guidance(
    apply: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    labels: jax.Array,
    null_label: Any,
    scale: float,
) -> ModelFn:
    """A ``model_fn(x, t)`` guided by ``labels``: ``uncond + scale * (cond - uncond)``.

    ``apply(x, t, labels)`` runs the model; the conditional and unconditional halves go through
    it as one batch of 2B (labels, then ``null_label`` broadcast to labels' shape: a null class
    id for labels [B], or a null context [L, D] for a context [B, L, D]). Scale 1: the conditional
    model alone, one batch of B. The result is a pytree (array leaves traced, see the module
    docstring); ``apply`` may be one too.
    """
    return jax.tree_util.Partial(_guided, apply, jnp.asarray(labels), null_label, float(scale))
