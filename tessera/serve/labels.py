"""Label names of an image classifier and its top-k readout (used by ``tessera.serve.classify``;
a module without command-line flags, so that importing it defines none)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tessera.configs.base import ConfigDict


def class_names(config: ConfigDict) -> tuple[str, ...]:
    """The model's label names in class order: ``model.class_names``, else the classes of the
    configured image source (``data.source``), else ``class_<i>``."""
    m = config.model
    names = tuple(m.get("class_names", ()))
    if not names:
        from tessera.data import IMAGE_SOURCES, image_classes

        try:
            if config.data.source in IMAGE_SOURCES:
                names = image_classes(config.data)
        except (OSError, ValueError):  # the training data is not on this machine
            names = ()
    if len(names) != m.num_classes:
        names = tuple(names[: m.num_classes]) + tuple(
            f"class_{i}" for i in range(len(names), m.num_classes)
        )
    return names


def top_k(probs: np.ndarray, names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """probs [N, C] -> per row the ``k`` most probable (name, probability), best first."""
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(names[c], float(p[c])) for c in row] for p, row in zip(probs, order, strict=True)]
