"""Config files, one per family. ``load_config("llama:tiny")`` or ``load_config("path.py:arg")``."""

from __future__ import annotations

import importlib.util
import os
import pkgutil
from collections.abc import Mapping
from typing import Any

from tessera.configs.base import (
    ConfigDict,
    apply_overrides,
    base_config,
    format_override,
    lookup,
    parse_override,
    split_config_arg,
)

__all__ = [
    "ConfigDict",
    "apply_overrides",
    "base_config",
    "config_names",
    "format_override",
    "load_config",
    "lookup",
    "parse_override",
    "resolve_config_path",
    "split_config_arg",
]

_HERE = os.path.dirname(__file__)


def config_names() -> list[str]:
    """Packaged config files (``llama``, ...)."""
    return sorted(m.name for m in pkgutil.iter_modules([_HERE]) if m.name != "base")


def resolve_config_path(spec: str) -> str:
    """``llama:tiny`` -> ``/.../tessera/configs/llama.py:tiny``; a path is returned unchanged."""
    name, sep, arg = spec.partition(":")
    if name.endswith(".py") or os.sep in name:
        if not os.path.exists(name):
            raise FileNotFoundError(f"config file {name!r} does not exist")
        return spec
    if name not in config_names():
        raise ValueError(f"unknown config {name!r}; packaged configs: {', '.join(config_names())}")
    return os.path.join(_HERE, f"{name}.py") + sep + arg


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ConfigDict:
    """Load ``name[:arg]`` or ``path.py[:arg]`` and apply dotted overrides (unknown key: error)."""
    path, _, arg = resolve_config_path(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location(f"_tessera_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: {e.msg}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} defines no get_config(arg)")
    config = module.get_config(arg or None)
    if overrides:
        apply_overrides(config, overrides)
    return config
