"""Named rematerialisation policies keyed on the ``checkpoint_name`` tags layers put on tensors."""

from __future__ import annotations

from typing import Any

import jax

_SAVED_BY_MINIMAL = ("query_proj", "key_proj", "value_proj", "attn_out", "mlp_out")

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "minimal": jax.checkpoint_policies.save_only_these_names(*_SAVED_BY_MINIMAL),
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
}


def remat_policy(name: str) -> Any:
    """Policy for ``nnx.remat`` (None: do not remat). Unknown names are an error."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat: unknown policy {name!r}; known: {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]
