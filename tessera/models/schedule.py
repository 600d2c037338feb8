"""Noise schedules and training objectives of discrete-time (DDPM-style) diffusion.

The forward process noises data ``x0`` at integer timestep ``t`` in ``[0, num_train_timesteps)``:

    x_t = alpha_t * x0 + sigma_t * eps,   alpha_t = sqrt(alphas_cumprod[t]),
                                          sigma_t = sqrt(1 - alphas_cumprod[t])

and the denoiser learns one of three equivalent targets (``prediction``): the noise ``eps``
("epsilon"), the velocity ``alpha_t * eps - sigma_t * x0`` ("v_prediction") or ``x0`` itself
("sample"). Betas follow diffusers' ``beta_schedule`` names (``cosine`` is its
``squaredcos_cap_v2``); they and ``alphas_cumprod`` are computed on the host in float64 (diffusers
rounds both to float32, a difference of about 1e-6 relative), and the jitted methods read float32
tables of ``alpha_t`` and ``sigma_t``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
COSINE_MAX_BETA = 0.999  # diffusers' betas_for_alpha_bar cap


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float):
    """Betas [num_train_timesteps] float64 for a schedule name (see ``SCHEDULES``).

    ``linear``: evenly spaced from beta_start to beta_end; ``scaled_linear`` (latent diffusion):
    evenly spaced square roots; ``cosine``: the Improved-DDPM ``alpha_bar(s) = cos((s + 0.008) /
    1.008 * pi / 2) ** 2`` discretised as ``1 - alpha_bar(i + 1 / T) / alpha_bar(i / T)``, capped at
    0.999 (beta_start / beta_end unused).
    """
    n = num_train_timesteps
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=np.float64) ** 2
    if schedule == "cosine":
        s = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], COSINE_MAX_BETA)
    raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {SCHEDULES}")


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Per-example scalars [B] (or a scalar) -> broadcastable against x [B, ...]."""
    v = jnp.asarray(v, jnp.float32)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def x0_eps_from(prediction: str, out: jax.Array, x_t: jax.Array, alpha, sigma):
    """(x0, eps) implied by a model output ``out`` for ``x_t = alpha * x0 + sigma * eps``.

    ``alpha`` / ``sigma``: scalars or [B]; out, x_t: [B, ...]. Float32 results. The samplers call
    this with the coefficients of their own step (Euler's fractional timesteps included).
    """
    out = out.astype(jnp.float32)
    x_t = x_t.astype(jnp.float32)
    alpha, sigma = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if prediction == "epsilon":
        return (x_t - sigma * out) / alpha, out
    if prediction == "v_prediction":
        return alpha * x_t - sigma * out, alpha * out + sigma * x_t
    if prediction == "sample":
        return out, (x_t - alpha * out) / sigma
    raise ValueError(_unknown_prediction(prediction))


def _unknown_prediction(prediction: str) -> str:
    return f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}"


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete noise schedule with its prediction type and the sampler options that belong to
    it (diffusers keeps them in one scheduler config). Arrays are host numpy float64 [T]."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    prediction: str = "epsilon"
    clip_sample: bool = False  # ddpm / ddim: clip predicted x0 to [-1, 1]
    steps_offset: int = 0  # ddpm / ddim: added to their "leading" timesteps
    set_alpha_to_one: bool = True  # ddim: last step to alpha_cumprod 1, else alphas_cumprod[0]

    @classmethod
    def build(
        cls,
        schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction: str = "epsilon",
        **options: Any,
    ) -> NoiseSchedule:
        """From a schedule name (``SCHEDULES``) and prediction type (``PREDICTIONS``); options:
        clip_sample, steps_offset, set_alpha_to_one. Defaults are diffusers' class defaults."""
        if prediction not in PREDICTIONS:
            raise ValueError(_unknown_prediction(prediction))
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        betas = make_betas(schedule, num_train_timesteps, beta_start, beta_end)
        return cls(betas, np.cumprod(1.0 - betas), prediction, **options)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> NoiseSchedule:
        """From ``config.model.diffusion``."""
        keys = (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "prediction",
            "clip_sample",
            "steps_offset",
            "set_alpha_to_one",
        )
        return cls.build(cfg["schedule"], **{k: cfg[k] for k in keys})

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha_t, sigma_t) float32 [B] for integer timesteps t [B]."""
        a = self.alphas_cumprod
        alpha = jnp.asarray(np.sqrt(a), jnp.float32)
        sigma = jnp.asarray(np.sqrt(1.0 - a), jnp.float32)
        return alpha[t], sigma[t]

    def snr(self, t: jax.Array) -> jax.Array:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2, float32 [B] (min-SNR loss weights)."""
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        return jnp.asarray(snr, jnp.float32)[t]

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """x_t = alpha_t * x0 + sigma_t * noise; x0, noise [B, ...], t [B] int. x0's dtype."""
        alpha, sigma = self.alpha_sigma(t)
        x_t = _bcast(alpha, x0) * x0.astype(jnp.float32) + _bcast(sigma, x0) * noise
        return x_t.astype(x0.dtype)

    def target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """What the model learns to output for x_t = add_noise(x0, noise, t): noise, the
        velocity alpha_t * noise - sigma_t * x0, or x0. x0's dtype."""
        if self.prediction == "epsilon":
            return noise.astype(x0.dtype)
        if self.prediction == "sample":
            return x0
        alpha, sigma = self.alpha_sigma(t)
        v = _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0.astype(jnp.float32)
        return v.astype(x0.dtype)

    def to_x0_eps(
        self, model_out: jax.Array, x_t: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(predicted x0, predicted eps), float32 [B, ...], from a model output at timesteps
        t [B] int."""
        alpha, sigma = self.alpha_sigma(t)
        return x0_eps_from(self.prediction, model_out, x_t, alpha, sigma)
