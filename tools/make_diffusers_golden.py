"""Golden files for diffusers parity: tiny random diffusers models and schedulers, and their
reference outputs.

Runs the reference library (torch + diffusers), never the tests: the tests read what this writes
under ``tests/fixtures/diffusers/<name>/``:

  config.json, diffusion_pytorch_model.safetensors   a model as ``save_pretrained`` writes it
                                                    (float32), for the importer
  reference.npz                                     inputs and reference outputs (each golden
                                                    function's docstring lists its arrays;
                                                    images and latents in tessera's NHWC layout)

plus ``tests/fixtures/diffusers/VERSIONS.json`` (torch and diffusers versions). Seeds are fixed,
so a rerun with the same versions writes the same bytes.

Set up a side virtualenv (not the project's):

  PYENV_VERSION=3.11.7 python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 diffusers==0.42.1 transformers==5.23.0 \\
      safetensors numpy

then ``/tmp/hfvenv/bin/python tools/make_diffusers_golden.py`` (all fixtures, or
``--only vae,unet``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from collections.abc import Callable

import diffusers
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "diffusers")

GOLDENS: dict[str, Callable[[str], None]] = {}


def golden(name: str) -> Callable[[Callable[[str], None]], Callable[[str], None]]:
    """Register ``fn(out_dir)`` as the fixture ``name``."""

    def register(fn: Callable[[str], None]) -> Callable[[str], None]:
        GOLDENS[name] = fn
        return fn

    return register


def nhwc(x: torch.Tensor) -> np.ndarray:
    """torch NCHW -> numpy float32 NHWC (tessera's layout)."""
    return x.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def save_reference(out_dir: str, **arrays: np.ndarray) -> None:
    np.savez(os.path.join(out_dir, "reference.npz"), **arrays)


def save_model(model: torch.nn.Module, out_dir: str) -> None:
    """``save_pretrained`` in float32 safetensors."""
    model.save_pretrained(out_dir, safe_serialization=True)


# Scheduler parity: noise schedules as tessera's NoiseSchedule.build kwargs (diffusers' class
# defaults; Stable Diffusion 2's v-prediction config; cosine with x0 prediction), and sampler runs
# (name, sampler, schedule, steps, eta) whose every step tests/serve replays.
_DEFAULT_SCHEDULE = dict(
    schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction="epsilon",
    clip_sample=True,
    steps_offset=0,
    set_alpha_to_one=True,
)
SCHEDULER_CONFIGS = {
    "default": _DEFAULT_SCHEDULE,
    "sd_v": _DEFAULT_SCHEDULE
    | dict(
        schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction="v_prediction",
        clip_sample=False,
        steps_offset=1,
        set_alpha_to_one=False,
    ),
    "cosine_x0": _DEFAULT_SCHEDULE
    | dict(schedule="cosine", prediction="sample", clip_sample=False),
}
SCHEDULER_RUNS = [
    ("ddpm", "ddpm", "default", 10, 0.0),
    ("ddim", "ddim", "default", 10, 0.0),
    ("ddim_eta", "ddim", "default", 10, 0.5),
    ("dpmpp_2m", "dpmpp_2m", "default", 10, 0.0),
    ("euler", "euler", "default", 10, 0.0),
    ("ddpm_sd_v", "ddpm", "sd_v", 7, 0.0),
    ("ddim_sd_v", "ddim", "sd_v", 7, 0.0),
    ("ddim_eta_sd_v", "ddim", "sd_v", 7, 1.0),
    ("dpmpp_2m_sd_v", "dpmpp_2m", "sd_v", 20, 0.0),
    ("euler_sd_v", "euler", "sd_v", 7, 0.0),
    ("ddim_cosine_x0", "ddim", "cosine_x0", 10, 0.0),
    ("dpmpp_2m_cosine_x0", "dpmpp_2m", "cosine_x0", 10, 0.0),
    ("euler_cosine_x0", "euler", "cosine_x0", 10, 0.0),
]


def diffusers_scheduler(sampler: str, config: dict):
    """The diffusers scheduler class for a sampler, configured from a SCHEDULER_CONFIGS entry
    (only the options the class takes)."""
    cls = {
        "ddpm": diffusers.DDPMScheduler,
        "ddim": diffusers.DDIMScheduler,
        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }[sampler]
    kwargs = dict(
        beta_schedule={"cosine": "squaredcos_cap_v2"}.get(config["schedule"], config["schedule"]),
        beta_start=config["beta_start"],
        beta_end=config["beta_end"],
        prediction_type=config["prediction"],
    )
    accepted = inspect.signature(cls.__init__).parameters
    options = ("clip_sample", "steps_offset", "set_alpha_to_one")
    kwargs.update({k: config[k] for k in options if k in accepted})
    return cls(**kwargs)


def closed_form_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The "denoiser" of the scheduler runs (tests/serve/test_scheduler_parity.py: the same)."""
    return 0.3 * x + 0.1 * torch.cos(t.to(torch.float32) / 100)


@golden("schedulers")
def schedulers_golden(out_dir: str) -> None:
    """Scheduler runs with a closed-form model; no weights. reference.npz:

    runs                JSON: [[name, sampler, schedule config, steps, eta], ...];
                        configs: JSON of SCHEDULER_CONFIGS
    x_T                 [2, 4, 4, 3] unit Gaussian, every run's start (before init_noise_sigma)
    <name>.timesteps    [steps] float64, the scheduler's timesteps
    <name>.states       [steps, 2, 4, 4, 3] the sample after each step
    <name>.noises       [steps, 2, 4, 4, 3] the noise each step drew (zeros: none)
    betas.<schedule>, alphas_cumprod.<schedule>   [1000] for linear, scaled_linear, cosine
    noise.x0, noise.eps [4, 2, 2, 3], noise.t [4]; noise.x_t, noise.v: DDPMScheduler(sd_v)'s
                        add_noise and get_velocity
    """
    x_T = torch.randn(2, 3, 4, 4)
    arrays = {"x_T": nhwc(x_T)}
    for name, sampler, config, steps, eta in SCHEDULER_RUNS:
        sched = diffusers_scheduler(sampler, SCHEDULER_CONFIGS[config])
        sched.set_timesteps(steps)
        gen, replay = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        x = x_T * sched.init_noise_sigma
        states, noises = [], []
        for t in sched.timesteps:
            out = closed_form_model(sched.scale_model_input(x, t), t)
            noise = torch.zeros_like(x)
            kwargs = {}
            if sampler == "ddpm" and t > 0:
                kwargs["generator"] = gen  # draws torch.randn(x.shape) as replay does
                noise = torch.randn(x.shape, generator=replay)
            elif sampler == "ddim" and eta > 0:
                noise = torch.randn(x.shape, generator=replay)
                kwargs.update(eta=eta, variance_noise=noise)
            x = sched.step(out, t, x, **kwargs).prev_sample
            states.append(nhwc(x))
            noises.append(nhwc(noise))
        arrays[f"{name}.timesteps"] = sched.timesteps.numpy().astype(np.float64)
        arrays[f"{name}.states"] = np.stack(states)
        if any(n.any() for n in noises):
            arrays[f"{name}.noises"] = np.stack(noises)
    named = {"linear": "default", "scaled_linear": "sd_v", "cosine": "cosine_x0"}
    for schedule, config in named.items():
        sched = diffusers_scheduler("ddpm", SCHEDULER_CONFIGS[config])
        arrays[f"betas.{schedule}"] = sched.betas.numpy()
        arrays[f"alphas_cumprod.{schedule}"] = sched.alphas_cumprod.numpy()
    sched = diffusers_scheduler("ddpm", SCHEDULER_CONFIGS["sd_v"])
    x0, eps, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 500, 999])
    arrays.update({"noise.x0": nhwc(x0), "noise.eps": nhwc(eps), "noise.t": t.numpy()})
    arrays["noise.x_t"] = nhwc(sched.add_noise(x0, eps, t))
    arrays["noise.v"] = nhwc(sched.get_velocity(x0, eps, t))
    arrays["runs"] = np.array(json.dumps(SCHEDULER_RUNS))
    arrays["configs"] = np.array(json.dumps(SCHEDULER_CONFIGS))
    save_reference(out_dir, **arrays)


def randomize(model: torch.nn.Module, norm_std: float = 0.2) -> None:
    """Every parameter random (seeded by the caller): weights ~ N(0, 1 / fan_in) so activations
    stay O(1), biases ~ N(0, norm_std^2), norm scales ~ 1 + N(0, norm_std^2). diffusers starts
    some outputs (DiT's adaLN-Zero and output layers) and all norm affines at constants, which
    would leave a parity test checking little."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + norm_std * torch.randn_like(p))
            else:
                p.copy_(norm_std * torch.randn_like(p))


def unet_golden(out_dir: str, **config) -> None:
    """A tiny random ``UNet2DConditionModel`` (``config``: its settings on top of 8 x 8 x 4
    latents, 1 layer per block, GroupNorm over 4 groups, 8-wide context). reference.npz:
    ``sample`` [2, 8, 8, 4] (NHWC), ``timesteps`` int32 [2], ``encoder_hidden_states``
    [2, 5, 8], ``output`` [2, 8, 8, 4] (NHWC)."""
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=8, **config,
    )
    model = diffusers.UNet2DConditionModel(**config).eval()
    randomize(model)
    sample = torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([37, 981])
    context = torch.randn(2, 5, 8)
    with torch.no_grad():
        output = model(sample, timesteps, encoder_hidden_states=context).sample
    save_model(model, out_dir)
    save_reference(
        out_dir, sample=nhwc(sample), timesteps=timesteps.numpy().astype(np.int32),
        encoder_hidden_states=context.numpy(), output=nhwc(output),
    )


@golden("unet")
def unet(out_dir: str) -> None:
    """Attention on the second (last) level, linear proj_in / proj_out (SD 2's), per-level
    heads in ``attention_head_dim`` (diffusers' naming quirk). See ``unet_golden``."""
    unet_golden(
        out_dir, block_out_channels=(8, 16), attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
    )


@golden("unet_conv")
def unet_conv(out_dir: str) -> None:
    """SD 1's layout: attention on the first level, two transformer layers, 1x1-conv
    proj_in / proj_out, one head count for every level, sin-before-cos features with a
    frequency shift. See ``unet_golden``."""
    unet_golden(
        out_dir, block_out_channels=(8, 16), attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=False,
        transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1,
    )


@golden("dit")
def dit(out_dir: str) -> None:
    """A tiny ``DiTTransformer2DModel`` (2 layers, 2 heads x 16, 4 -> 8 channels (learned
    sigma), 8 x 8 latents in 2 x 2 patches, 10 classes), every weight random; the conditioning
    embedder that diffusers copies into each block is one set of weights, as in the hub's DiT
    checkpoints. reference.npz: ``sample`` [3, 8, 8, 4] (NHWC), ``timesteps`` int [3],
    ``class_labels`` int [3] (10: the null class), ``output`` [3, 8, 8, 8] (NHWC)."""
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()
    randomize(model)
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    sample = torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 437, 999])
    class_labels = torch.tensor([3, 10, 7])
    with torch.no_grad():
        output = model(sample, timestep=timesteps, class_labels=class_labels).sample
    save_model(model, out_dir)
    save_reference(
        out_dir, sample=nhwc(sample), timesteps=timesteps.numpy(),
        class_labels=class_labels.numpy(), output=nhwc(output),
    )


@golden("vae")
def vae(out_dir: str) -> None:
    """A tiny ``AutoencoderKL`` (levels of 8 and 16 channels, f = 2, 2 resnets a level, 4 groups,
    mid-block attention, SD's scaling factor and null shift), every weight random. Arrays:
    ``images`` [2, 16, 16, 3] in [-1, 1]; the encoder's ``mean`` and ``logvar`` [2, 8, 8, 4];
    ``latents`` [2, 8, 8, 4] (unscaled z) and their ``decoded`` images [2, 16, 16, 3]."""
    model = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    randomize(model)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand((2, 3, 16, 16), generator=gen) * 2 - 1
    latents = torch.randn((2, 4, 8, 8), generator=gen)
    with torch.no_grad():
        posterior = model.encode(images).latent_dist
        decoded = model.decode(latents).sample
    save_model(model, out_dir)
    save_reference(
        out_dir,
        images=nhwc(images),
        mean=nhwc(posterior.mean),
        logvar=nhwc(posterior.logvar),
        latents=nhwc(latents),
        decoded=nhwc(decoded),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(GOLDENS)
    unknown = sorted(set(names) - set(GOLDENS))
    if unknown:
        parser.error(f"unknown fixtures {unknown}; known: {sorted(GOLDENS)}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    for name in names:
        out_dir = os.path.join(FIXTURES, name)
        os.makedirs(out_dir, exist_ok=True)
        torch.manual_seed(0)
        np.random.seed(0)
        GOLDENS[name](out_dir)
        print(f"{name}: wrote {sorted(os.listdir(out_dir))}")
    with open(os.path.join(FIXTURES, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
