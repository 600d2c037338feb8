"""Configs on both sides: HF ``config.json`` <-> tessera config, and a workdir's own config.

An imported workdir holds ``imported_config.json`` (the full tessera config of the imported model)
and ``config.py``, a config file whose ``get_config(arg)`` returns that JSON as a locked
ConfigDict, so ``--config=WORKDIR/config.py`` works with ``tessera.train`` and
``tessera.serve.decode``. ``config.json`` is the same config at import; the trainer rewrites it
with each run's overrides, which therefore do not leak into ``config.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from tessera.configs import load_config
from tessera.configs.base import ConfigDict, apply_overrides, base_config, flat_items
from tessera.convert.errors import ConversionError
from tessera.convert.families import family_for
from tessera.layers.base import dtype_of

HF_CONFIG = "config.json"
SOURCE_CONFIG = "hf_config.json"  # the imported model's HF config, kept for export

IMPORTED_CONFIG = "imported_config.json"

CONFIG_PY = '''"""Config of a model imported by tessera.convert: the locked ConfigDict in
imported_config.json beside this file. ``arg``: ``key=value,...`` overrides, as for packaged
configs."""

import os

from tessera.convert.configs import config_from_json


def get_config(arg=None):
    here = os.path.dirname(os.path.abspath(__file__))
    return config_from_json(os.path.join(here, "imported_config.json"), arg)
'''


def _special_floats(obj: dict) -> Any:
    """transformers 5 writes inf / nan as {"__float__": "Infinity"}."""
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"Hugging Face model directory {hf_dir} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir} has no {HF_CONFIG}")
    try:
        with open(path) as f:
            hf = json.load(f, object_hook=_special_floats)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return hf


def float_dtype(name: str) -> str:
    """The canonical name of a floating-point dtype (ValueError for anything else)."""
    dtype = dtype_of(name)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype {name!r} is not a floating-point dtype")
    return dtype.name


def checkpoint_dtype(hf: Mapping[str, Any]) -> str | None:
    """The dtype an HF ``config.json`` declares for its weights: ``dtype`` (transformers 5),
    else ``torch_dtype`` (older); None when neither is written or both say ``"auto"``
    (diffusers configs carry none). ``"torch.bfloat16"`` reads as ``"bfloat16"``; a dtype that
    is not floating-point (a quantized checkpoint's ``int8``) is a ConversionError."""
    for key in ("dtype", "torch_dtype"):
        value = hf.get(key)
        if value is None or value == "auto":
            continue
        name = str(value).removeprefix("torch.")
        try:
            return float_dtype(name)
        except ValueError:
            raise ConversionError(
                f"config.json has {key}={value!r}, not a floating-point dtype tessera computes "
                "in; pass --dtype=float32 (or bfloat16) to choose the parameter dtype"
            ) from None
    return None


@dataclasses.dataclass(frozen=True)
class ImportDtypes:
    """The parameter and compute dtypes of an import and where each came from (for the log)."""

    param: str
    compute: str
    param_source: str
    compute_source: str

    def note(self) -> str:
        """The import log line: both dtypes, their sources, and how to compute in the other."""
        other = "bfloat16" if self.compute != "bfloat16" else "float32"
        return (
            f"dtype: model.param_dtype={self.param} ({self.param_source}), "
            f"model.dtype={self.compute} (compute, {self.compute_source}); "
            f"--compute_dtype={other} (or --set=model.dtype={other}) computes in {other}"
        )


def import_dtypes(
    hf: Mapping[str, Any],
    *,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ImportDtypes:
    """The dtypes an import uses. Parameters: ``dtype``, else the checkpoint's
    (``checkpoint_dtype``). Compute (``model.dtype``): ``compute_dtype``, else the parameter
    dtype, as transformers computes in the dtype it loads. ``overrides`` of ``model.param_dtype``
    / ``model.dtype`` win (``compute_dtype`` and a different ``model.dtype`` override are an
    error)."""
    overrides = overrides or {}

    def named(flag: str, name: Any) -> str:
        try:
            return float_dtype(str(name))
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None

    if dtype is not None:
        param, param_source = named("--dtype", dtype), "--dtype"
    else:
        declared = checkpoint_dtype(hf)  # transformers' default, float32, when it names none
        param = declared or "float32"
        param_source = ("the checkpoint's config.json dtype" if declared
                        else "config.json names no dtype: float32")
    if "model.param_dtype" in overrides:
        param = named("--set=model.param_dtype", overrides["model.param_dtype"])
        param_source = "--set"
    if compute_dtype is not None:
        compute, compute_source = named("--compute_dtype", compute_dtype), "--compute_dtype"
        also = overrides.get("model.dtype")
        if also is not None and named("--set=model.dtype", also) != compute:
            raise ValueError(
                f"--compute_dtype={compute_dtype} and --set=model.dtype={overrides['model.dtype']}"
                " disagree; pass one of them"
            )
    elif "model.dtype" in overrides:
        compute = named("--set=model.dtype", overrides["model.dtype"])
        compute_source = "--set"
    else:
        compute, compute_source = param, "the parameter dtype"
    return ImportDtypes(param, compute, param_source, compute_source)


def tessera_config(
    hf: Mapping[str, Any],
    *,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ConfigDict:
    """The full tessera config of an HF config: the family's starting config (``Family.packaged``,
    else the base config) with the base ``model`` defaults overlaid by the family's model fields.

    ``dtype`` / ``compute_dtype``: the parameter dtype (``model.param_dtype``) and the compute
    dtype (``model.dtype``); by default both are the checkpoint's (``import_dtypes``).
    ``overrides``: dotted keys applied last (``{"model.dtype": "bfloat16", "mesh.fsdp": 2}``).
    """
    dtypes = import_dtypes(hf, dtype=dtype, compute_dtype=compute_dtype, overrides=overrides)
    family = family_for(hf.get("model_type", hf.get("_class_name")))
    config = load_config(family.packaged) if family.packaged else base_config()
    config.unlock()  # lock() is a no-op on a locked config and would leave the new model open
    config.model = base_config().model  # the preset's model shape does not leak into the import
    config.lock()
    fields = {f"model.{k}": v for k, v in family.model_fields(hf).items()}
    apply_overrides(
        config, {**fields, "model.param_dtype": dtypes.param, "model.dtype": dtypes.compute}
    )
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    rest = {k: v for k, v in (overrides or {}).items()
            if k not in ("model.param_dtype", "model.dtype")}
    apply_overrides(config, rest)
    return config


def hf_config(
    config: ConfigDict, *, dtype: str, source: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """HF ``config.json`` for a tessera config: ``source`` (the imported HF config, for keys
    tessera does not model such as token ids) overlaid with the family's mapped keys. Diffusers
    configs carry no dtype (a diffusers model's constructor refuses the key)."""
    family = family_for(config.model.family)
    out = dict(source or {})
    out.update(family.hf_config(config.model))
    dtype = float_dtype(dtype)
    if not family.diffusers:
        out["dtype"] = out["torch_dtype"] = dtype
    out.pop("transformers_version", None)
    return dict(sorted(out.items()))


def config_from_json(path: str, arg: str | None = None) -> ConfigDict:
    """The locked config stored at ``path`` (written by ``write_workdir_config`` or the
    trainer), with ``arg`` = ``"key=value,..."`` overrides; keys the base config lacks are
    errors, keys it gained since take their defaults."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        stored = json.load(f)
    config = base_config()
    config.lock()
    apply_overrides(config, flat_items(stored))
    overrides = {}
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not key=value")
        overrides[key.strip()] = value.strip()
    apply_overrides(config, overrides)
    return config


def write_workdir_config(config: ConfigDict, workdir: str) -> None:
    """``workdir/{config.json, imported_config.json, config.py}`` (see the module doc)."""
    for name in ("config.json", IMPORTED_CONFIG):
        with open(os.path.join(workdir, name), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
            f.write("\n")
    with open(os.path.join(workdir, "config.py"), "w") as f:
        f.write(CONFIG_PY)
