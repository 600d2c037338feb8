"""``python -m tessera.serve.classify --config=vit:tiny --workdir=DIR --images=A.png,B.jpg``.

Loads the latest checkpoint of the workdir (or ``--step``) onto the mesh of ``config.mesh``,
decodes, resizes and normalises each image exactly as the eval pipeline does
(``tessera.data.load_image``), and prints the ``--top_k`` labels with their probabilities, one
block per image::

    circle.png
      0.962  circle
      0.021  ring

Label names: ``model.class_names`` (Hugging Face imports keep ``id2label`` there), else the
classes of the configured image source (``data.source``: the shapes set, or the sub-folders of
an image folder), else ``class_<i>``. ``--json`` prints one JSON object per image instead.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from tessera.cli import check_workdir, fail, run_main
from tessera.serve.labels import class_names, top_k

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config: a packaged name (vit:tiny) or path/to/file.py[:arg].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
_IMAGES = flags.DEFINE_list("images", [], "Image files to classify (comma-separated).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Labels printed per image.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_JSON = flags.DEFINE_bool("json", False, "One JSON object per image instead of text.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        fail("--config is required (e.g. --config=vit:tiny)")
    if not _WORKDIR.value:
        fail("--workdir is required")
    if not _IMAGES.value:
        fail("--images is required (comma-separated image files)")
    if _TOP_K.value < 1 or _BATCH.value < 1:
        fail("--top_k and --batch_size must be >= 1")
    if config.model.name != "vit":
        fail(f"model.name={config.model.name!r} is not an image classifier (model.name='vit')")
    check_workdir(_WORKDIR.value, write=False)
    from tessera.data import load_image

    m = config.model
    images = np.stack([load_image(path, m.image_size) for path in _IMAGES.value])

    import jax

    from tessera.models.create import ModelSpec
    from tessera.serve.loading import restore_params
    from tessera.sharding import make_mesh, make_rules, use_mesh

    mesh = make_mesh(config.mesh)
    rules = make_rules(config.mesh.rules)
    spec = ModelSpec(m)
    step, params = restore_params(spec, _WORKDIR.value, spec.shardings(mesh, rules), _STEP.value)
    print(
        f"tessera: classifying {len(images)} images with step {step} of {_WORKDIR.value} "
        f"({spec.num_params() / 1e6:.2f}M params)", file=sys.stderr, flush=True,
    )

    @jax.jit
    def probabilities(params, x):
        with use_mesh(mesh, rules):
            return jax.nn.softmax(spec.merge(params)(x).logits, axis=-1)

    # Every pass has --batch_size rows (the last padded) so the forward compiles once.
    size = min(_BATCH.value, len(images))
    probs = []
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        pad = np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)
        padded = np.concatenate([chunk, pad])
        probs.append(np.asarray(probabilities(params, padded))[: len(chunk)])
    names = class_names(config)
    k = min(_TOP_K.value, m.num_classes)
    for path, labels in zip(_IMAGES.value, top_k(np.concatenate(probs), names, k), strict=True):
        if _JSON.value:
            print(json.dumps({"image": path, "top_k": [{"label": n, "p": p} for n, p in labels]}))
        else:
            print(path)
            for name, p in labels:
                print(f"  {p:.3f}  {name}")


if __name__ == "__main__":
    run_main(main)
