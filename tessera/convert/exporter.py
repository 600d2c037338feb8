"""tessera workdir (or params in memory) -> Hugging Face model directory.

Writes ``config.json`` (the family's keys, over the source HF config's when the workdir was
imported) and ``model.safetensors`` (or shards + index past ``max_shard_bytes``) in ``dtype``,
plus the workdir's tokenizer files. The directory is assembled under a temporary name and
renamed at the end, so a failed export leaves nothing half-written.

With several processes (a multi-host mesh; ``hf_dir`` on a filesystem they share) each process
writes its own safetensors files: the tensors are split into runs of about equal bytes, one per
process (``safetensors_io.plan_shards``), each gathered to the process that writes it. Once
every process has written its files, process 0 writes the index and ``config.json``, renames
the directory, and (``export_hf``) copies the tokenizer files. The content is the one-process
export's, split into more files (at least one per process that owns tensors), which
transformers loads through the index.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from tessera.configs.base import ConfigDict
from tessera.convert.configs import HF_CONFIG, SOURCE_CONFIG, config_from_json, hf_config
from tessera.convert.errors import ConversionError
from tessera.convert.families import family_for
from tessera.convert.importer import TOKENIZER_DIR, copy_tokenizer
from tessera.convert.params import hf_shapes, hf_tensors
from tessera.convert.safetensors_io import plan_shards, shard_names, write_index, write_shards
from tessera.distributed import barrier
from tessera.models.create import ModelSpec
from tessera.sharding import make_mesh, make_rules
from tessera.train.checkpoints import load_params

PyTree = Any

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


def save_hf(
    params: PyTree,
    config: ConfigDict,
    hf_dir: str,
    *,
    dtype: str = "float32",
    source: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``params`` of a model with ``config`` as an HF directory (must not exist yet);
    returns the files written. ``source``: the HF config it was imported from, if any."""
    if os.path.exists(hf_dir) and os.listdir(hf_dir):
        raise ConversionError(f"{hf_dir} exists and is not empty; export into a new directory")
    family = family_for(config.model.family)
    hf = hf_config(config, dtype=dtype, source=source)
    stem, process = family.weights_stem, jax.process_index()
    itemsize = np.dtype(dtype).itemsize
    files = plan_shards(
        [(n, math.prod(s) * itemsize) for n, s in hf_shapes(params, family, config.model)],
        max_shard_bytes, processes=jax.process_count(), stem=stem,
    )
    owners = {t: f.process for f in files for t in f.tensors}
    tmp = hf_dir.rstrip(os.sep) + ".partial"
    if process == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier("tessera.convert.save_hf:start")
    try:
        write_shards(
            tmp,
            hf_tensors(params, family, config.model, dtype, owners),
            [f for f in files if f.process == process],
        )
        barrier("tessera.convert.save_hf:written")
        if process == 0:
            write_index(tmp, files, stem)
            with open(os.path.join(tmp, HF_CONFIG), "w") as f:
                json.dump(hf, f, indent=2)
                f.write("\n")
            if os.path.isdir(hf_dir):
                os.rmdir(hf_dir)
            os.replace(tmp, hf_dir)
        barrier("tessera.convert.save_hf:done")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [HF_CONFIG, *shard_names(files, stem)]


def export_hf(
    workdir: str,
    hf_dir: str,
    *,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[int, list[str]]:
    """Export checkpoint ``step`` (default: the latest) of ``workdir``; returns (step, files).

    The parameters are restored sharded over all devices (fsdp) whatever mesh the workdir's
    config names, so a model trained on a pod exports from a smaller host."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    config = config_from_json(os.path.join(workdir, "config.json"))
    family_for(config.model.family)  # unsupported family: fail before reading the checkpoint
    source = None
    if os.path.isfile(os.path.join(workdir, SOURCE_CONFIG)):
        with open(os.path.join(workdir, SOURCE_CONFIG)) as f:
            source = json.load(f)
    config.mesh.update(data=1, fsdp=-1, expert=1, sequence=1, tensor=1)
    config.mesh.update(dcn_data=-1, dcn_fsdp=1, dcn_expert=1, dcn_sequence=1, dcn_tensor=1)
    mesh = make_mesh(config.mesh, devices)
    spec = ModelSpec(config.model)
    step, params = load_params(workdir, spec.abstract(mesh, make_rules(config.mesh.rules)), step)
    files = save_hf(
        params, config, hf_dir, dtype=dtype, source=source, max_shard_bytes=max_shard_bytes
    )
    files += copy_tokenizer(os.path.join(workdir, TOKENIZER_DIR), hf_dir)
    return step, files
