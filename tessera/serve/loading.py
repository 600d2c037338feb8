"""Load a trained model for decoding: the parameters of a workdir's checkpoint, on a mesh.

The trainer saves ``{"params", "opt_state", "step"}`` under ``WORKDIR/checkpoints/<step>/state``
(see ``tessera.train.checkpoints``). Decoding restores only ``params`` (no optimizer state is
read into memory), each array straight onto the configured mesh's shardings, after checking that
the stored tensors fit the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from tessera.configs.base import ConfigDict
from tessera.data import check_vocab, get_tokenizer
from tessera.data.tokenizers import Tokenizer
from tessera.models.create import ModelSpec, abstract_arrays
from tessera.serve.engine import Decoder
from tessera.sharding import make_mesh, make_rules
from tessera.train.checkpoints import load_params

PyTree = Any


def restore_params(
    spec: ModelSpec,
    workdir: str,
    shardings: PyTree,
    step: int | None = None,
    key: str = "params",
) -> tuple[int, PyTree]:
    """(step, params) from ``workdir``'s checkpoint ``step`` (default: the latest), each array
    placed with ``shardings`` (a tree like ``spec.shapes``); ``key="ema"``: the parameters'
    moving average."""
    return load_params(workdir, abstract_arrays(spec.shapes, shardings), step, key)


def load_decoder(
    config: ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    tokenizer: Tokenizer | None = None,
    **decoder_kwargs: Any,
) -> tuple[Decoder, int]:
    """A Decoder for ``config`` with the parameters of ``workdir``'s checkpoint (latest, or
    ``step``) on the mesh of ``config.mesh``; returns it and the step restored. The tokenizer is
    ``tokenizer``, else ``config.data.tokenizer`` (a relative ``hf:`` / ``spm:`` path taken
    relative to ``workdir``), which must have no more ids than ``model.vocab_size``
    (``check_vocab``: a ValueError before the checkpoint is read)."""
    if config.model.name != "lm":
        raise ValueError(
            f"model.name={config.model.name!r} is not a decoder LM: decode needs model.name='lm'"
        )
    mesh = make_mesh(config.mesh, devices)
    rules = make_rules(config.mesh.rules)
    spec = ModelSpec(config.model)
    if tokenizer is None:
        tokenizer = get_tokenizer(config.data.tokenizer, base_dir=workdir, data_cfg=config.data)
        check_vocab(tokenizer, int(config.model.vocab_size), name=config.data.tokenizer)
    shardings = spec.shardings(mesh, rules, strict=bool(config.mesh.get("strict", False)))
    step, params = restore_params(spec, workdir, shardings, step)
    decoder = Decoder(spec, params, mesh, rules, tokenizer=tokenizer, **decoder_kwargs)
    return decoder, step
