"""``python -m tessera.serve.sample --config=ldm:tiny --workdir=DIR --output=grid.png``.

Samples ``--num_images`` images from the diffusion workdir's latest checkpoint (or ``--step``;
its EMA weights when the run kept them, unless ``--noema``) and writes them as one PNG grid.
Settings default to the config's ``decode`` section::

  --sampler   ddpm | ddim | dpmpp_2m | euler      (decode.sampler)
  --steps     denoising steps                    (decode.steps)
  --guidance  classifier-free guidance scale     (decode.guidance; 1: none)
  --eta       DDIM's noise (0: deterministic)     (decode.eta)
  --class_label  the class of every image, -1: the classes in turn (decode.class_label)
  --seed      noise seed; the same seed gives the same images (decode.seed)

A progress bar counts the sampler's steps; the last line says what was written.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from tessera.cli import check_workdir, fail, run_main

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config: a packaged name (ldm:tiny) or path/to/file.py[:arg].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Diffusion training workdir (checkpoints/).")
_OUTPUT = flags.DEFINE_string("output", None, "PNG file the image grid is written to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
_EMA = flags.DEFINE_bool("ema", None, "Sample with the EMA weights (default: when kept).")
_NUM = flags.DEFINE_integer("num_images", None, "Images to sample (decode.num_images).")
_LABEL = flags.DEFINE_integer("class_label", None, "Class of every image; -1: classes in turn.")
_SAMPLER = flags.DEFINE_string("sampler", None, "ddpm | ddim | dpmpp_2m | euler.")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps (decode.steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (1: none).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (decode.eta).")
_SEED = flags.DEFINE_integer("seed", None, "Noise seed (decode.seed).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images per sampling batch (default: all).")
_SCALE = flags.DEFINE_integer("scale", 4, "Pixels per image pixel in the PNG (nearest).")


def _setting(flag: flags.FlagHolder, default):
    return default if flag.value is None else flag.value


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        fail("--config is required (e.g. --config=ldm:tiny)")
    if not _WORKDIR.value or not _OUTPUT.value:
        fail("--workdir and --output are required")
    if not _OUTPUT.value.lower().endswith(".png"):
        fail(f"--output={_OUTPUT.value} must name a .png file")
    d = config.decode
    num = _setting(_NUM, d.num_images)
    sampler, steps = _setting(_SAMPLER, d.sampler), _setting(_STEPS, d.steps)
    guidance, eta = _setting(_GUIDANCE, d.guidance), _setting(_ETA, d.eta)
    seed, label = _setting(_SEED, d.seed), _setting(_LABEL, d.class_label)
    if num < 1 or _SCALE.value < 1 or (_BATCH.value is not None and _BATCH.value < 1):
        fail("--num_images, --batch_size and --scale must be >= 1")
    check_workdir(_WORKDIR.value, write=False)
    from tessera.models.schedule import NoiseSchedule
    from tessera.serve.images import class_labels, generate, load_denoiser, write_grid
    from tessera.serve.samplers import make_plan

    make_plan(NoiseSchedule.from_config(config.model.diffusion), sampler, steps, eta)  # checks
    labels = class_labels(num, label, config.model.num_classes)
    denoiser = load_denoiser(config, _WORKDIR.value, step=_STEP.value, ema=_EMA.value)
    print(
        f"tessera: sampling {num} images with {sampler} ({steps} steps, guidance {guidance}) "
        f"from step {denoiser.step} of {_WORKDIR.value}"
        f"{' (EMA weights)' if denoiser.ema else ''}",
        file=sys.stderr, flush=True,
    )
    batches = -(-num // (_BATCH.value or num))
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=batches * steps, unit="step", dynamic_ncols=True)
    done = [0]

    def progress(i: int, total: int) -> None:  # i: steps done of this batch's total
        done[0] += 1
        if bar is not None:
            bar.update(1)
        elif i == total:
            print(f"tessera: batch done ({done[0]}/{batches * steps} steps)", file=sys.stderr)

    images = generate(
        denoiser, labels, sampler=sampler, steps=steps, guidance=guidance, eta=eta, seed=seed,
        batch_size=_BATCH.value, progress=progress,
    )
    if bar is not None:
        bar.close()
    write_grid(images, _OUTPUT.value, scale=_SCALE.value)
    print(f"tessera: wrote {num} images ({images.shape[1]}x{images.shape[2]}) to {_OUTPUT.value}")


if __name__ == "__main__":
    run_main(main)
