"""Named rematerialisation policies keyed on the ``checkpoint_name`` tags layers put on tensors.

``minimal`` keeps the tensors every registered mixer lists in its ``REMAT_SAVED`` (projection
outputs: attention q/k/v and output, MLP output, state-space in/out projections) and recomputes
the rest; a new mixer declares its own tags next to its code.
"""

from __future__ import annotations

import functools
from typing import Any

import jax


@functools.cache
def minimal_saved_names() -> tuple[str, ...]:
    """Every ``REMAT_SAVED`` tag of the registered sequence and channel mixers."""
    from tessera.layers.mixers import CHANNEL_MIXERS, SEQUENCE_MIXERS

    names: list[str] = []
    for cls in (*SEQUENCE_MIXERS.values(), *CHANNEL_MIXERS.values()):
        names += [n for n in getattr(cls, "REMAT_SAVED", ()) if n not in names]
    return tuple(names)


POLICY_NAMES = ("none", "minimal", "save_dots", "full")


@functools.cache
def remat_policy(name: str) -> Any:
    """Policy for ``nnx.remat`` (None: do not remat; one object per name). Unknown names are an
    error.

    none: keep every activation; minimal: keep the tagged projection outputs; save_dots: keep
    matmul outputs without batch dimensions; full: recompute the whole block.
    """
    if name == "none":
        return None
    if name == "minimal":
        return jax.checkpoint_policies.save_only_these_names(*minimal_saved_names())
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"model.remat: unknown policy {name!r}; known: {sorted(POLICY_NAMES)}")
