"""Hugging Face model directory -> tessera model on a mesh, or -> a tessera workdir.

``read_hf`` / ``load_hf`` give the model in memory; ``import_hf`` writes a workdir that
``tessera.train`` fine-tunes from and ``tessera.serve.decode`` decodes from:

  WORKDIR/checkpoints/0      params + a fresh optimizer state (train resumes at step 0)
  WORKDIR/config.json        the full tessera config;  WORKDIR/config.py  reads it (--config=)
  WORKDIR/hf_config.json     the source config.json (export keeps the keys tessera does not use)
  WORKDIR/tokenizer/         the tokenizer files, copied; with a tokenizer.json the config's
                             data.tokenizer is "hf:tokenizer" (loaded relative to the
                             workdir), else with a SentencePiece tokenizer.model it is
                             "spm:tokenizer", else it stays "byte" (families that read tokens)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tessera.configs.base import ConfigDict
from tessera.convert.configs import (
    SOURCE_CONFIG,
    import_dtypes,
    read_hf_config,
    tessera_config,
    write_workdir_config,
)
from tessera.convert.errors import ConversionError
from tessera.convert.families import family_for
from tessera.convert.params import read_params
from tessera.convert.safetensors_io import SafetensorsReader
from tessera.data.tokenizers import (
    HF_PREFIX,
    HF_TOKENIZER_FILE,
    SPM_MODEL_FILE,
    SPM_PREFIX,
    HFTokenizer,
    SentencePieceTokenizer,
)
from tessera.distributed import barrier
from tessera.models.create import ModelSpec
from tessera.sharding import make_mesh, make_rules
from tessera.train.checkpoints import Checkpointer
from tessera.train.trainer import Trainer

PyTree = Any

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
TOKENIZER_DIR = "tokenizer"
TOKENIZER_NAME = HF_PREFIX + TOKENIZER_DIR  # data.tokenizer of an import with a tokenizer.json
SPM_TOKENIZER_NAME = SPM_PREFIX + TOKENIZER_DIR  # ... with a SentencePiece tokenizer.model only


@dataclasses.dataclass
class Imported:
    """A model read from HF: its config, param spec, params (sharded on ``mesh``) and rules."""

    config: ConfigDict
    spec: ModelSpec
    params: PyTree
    mesh: Mesh
    rules: dict


def read_hf(
    hf_dir: str,
    *,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Imported:
    """Read an HF model directory onto the mesh of its config (``overrides`` such as
    ``{"mesh.fsdp": 2, "model.dtype": "bfloat16"}``). ``dtype`` / ``compute_dtype``: the
    parameter / compute dtype, by default the checkpoint's (``configs.import_dtypes``)."""
    config = tessera_config(
        read_hf_config(hf_dir), dtype=dtype, compute_dtype=compute_dtype, overrides=overrides
    )
    reader = SafetensorsReader(hf_dir)
    mesh = make_mesh(config.mesh, devices)
    rules = make_rules(config.mesh.rules)
    spec = ModelSpec(config.model)
    family = family_for(config.model.family)
    shardings = spec.shardings(mesh, rules, strict=bool(config.mesh.strict))
    params = read_params(reader, family, config.model, spec.shapes, shardings)
    return Imported(config, spec, params, mesh, rules)


def load_hf(
    path: str,
    *,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[ConfigDict, nnx.Module]:
    """(config, model): the tessera model of an HF directory, parameters on the config's mesh.

    Call the model inside ``tessera.sharding.use_mesh(mesh, config.mesh.rules)`` for sharded
    activations; ``read_hf`` gives the pure parameter tree instead (for ``jax.jit``)."""
    imported = read_hf(
        path, dtype=dtype, compute_dtype=compute_dtype, overrides=overrides, devices=devices
    )
    return imported.config, imported.spec.merge(imported.params)


def import_hf(
    hf_dir: str,
    workdir: str,
    *,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    devices: Sequence[jax.Device] | None = None,
    log: Callable[[str], None] | None = None,
) -> ConfigDict:
    """Write the workdir described in the module doc; returns its config. Everything is read
    and checked before anything is written, and a workdir that has checkpoints is refused.
    ``dtype`` / ``compute_dtype``: as for ``read_hf`` (default: the checkpoint's dtype for both).
    ``log`` receives a line naming the parameter and compute dtypes, where each came from and
    how to change the compute dtype, and one saying which tokenizer the config uses and why
    (families that read tokens)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise ConversionError(f"{workdir} already has checkpoints; import into a new workdir")
    hf = read_hf_config(hf_dir)
    dtypes = import_dtypes(hf, dtype=dtype, compute_dtype=compute_dtype, overrides=overrides)
    config = tessera_config(hf, dtype=dtype, compute_dtype=compute_dtype, overrides=overrides)
    family = family_for(config.model.family)
    note = None
    if family.tokenizer and "data.tokenizer" in (overrides or {}):
        note = f"data.tokenizer={config.data.tokenizer!r}, as overridden"
    elif family.tokenizer:
        config.data.tokenizer, note = tokenizer_for_import(hf_dir, config.model.vocab_size)
    reader = SafetensorsReader(hf_dir)
    # The trainer's own shardings and optimizer, so `tessera.train` restores this state as is.
    trainer = Trainer(config, workdir, devices)
    shardings = trainer.state_shardings
    params = read_params(
        reader, family, config.model, trainer.spec.shapes, shardings["params"]
    )
    state = {
        "params": params,
        "opt_state": jax.jit(trainer.tx.init, out_shardings=shardings["opt_state"])(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
    }
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    try:
        ckpt.save(0, state, {})
    finally:
        ckpt.close()
    if jax.process_index() == 0:  # the workdir is shared by every process of a run
        write_workdir_config(config, workdir)
        with open(os.path.join(workdir, SOURCE_CONFIG), "w") as f:
            json.dump(hf, f, indent=2)
            f.write("\n")
    copy_tokenizer(hf_dir, os.path.join(workdir, TOKENIZER_DIR))
    barrier("tessera.convert.import_hf:done")
    if log is not None:
        log(dtypes.note())
    if log is not None and note:
        log(f"tokenizer: {note}")
    return config


def tokenizer_for_import(hf_dir: str, vocab_size: int) -> tuple[str, str]:
    """(data.tokenizer, a note saying why) for an import of ``hf_dir``: ``"hf:tokenizer"`` when
    its tokenizer.json loads, else ``"spm:tokenizer"`` when its SentencePiece tokenizer.model
    loads (the files are copied to WORKDIR/tokenizer), else ``"byte"``. A tokenizer with more
    ids than ``vocab_size`` is still chosen, and the note says that training and decode refuse
    it (``check_vocab``) until the config changes."""
    candidates = (
        (HF_TOKENIZER_FILE, TOKENIZER_NAME, HFTokenizer),
        (SPM_MODEL_FILE, SPM_TOKENIZER_NAME, SentencePieceTokenizer),
    )
    failures = []
    for file, name, cls in candidates:
        path = os.path.join(hf_dir, file)
        if not os.path.isfile(path):
            continue
        try:
            tokenizer = cls(path)
        except (ValueError, OSError) as e:
            failures.append(str(e))
            continue
        note = f"data.tokenizer={name!r} ({tokenizer.vocab_size} ids"
        if tokenizer.vocab_size > vocab_size:
            note += (
                f", more than the model's vocab_size {vocab_size}: training and decode refuse "
                "it until model.vocab_size or data.tokenizer changes"
            )
        return name, note + ")"
    if failures:
        return "byte", f"{'; '.join(failures)}; data.tokenizer stays 'byte'"
    return "byte", (
        f"{hf_dir} has no {HF_TOKENIZER_FILE} or {SPM_MODEL_FILE}; data.tokenizer stays 'byte', "
        "which is not the model's tokenizer (--set=data.tokenizer=hf:PATH or spm:PATH names "
        "another)"
    )


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of ``src`` present there into ``dst``; returns their names.
    With several processes, process 0 copies them (``dst`` is shared)."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if names and jax.process_index() == 0:
        os.makedirs(dst, exist_ok=True)
        for name in names:
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return names
