"""What the two-process job and its test share: the config, the prompt, flat parameter dicts."""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.train.helpers import tiny_config

PROMPT = [1, 5, 9, 14, 3]


def config():
    """llama:tiny in float32 on a (data=2, fsdp=4) mesh: with 2 processes × 4 devices, the data
    axis spans the processes and fsdp the devices of each."""
    return tiny_config(data=2, fsdp=4)


def flat(tree: Any) -> dict[str, np.ndarray]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}
