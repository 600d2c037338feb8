"""RoPE config <-> ``model.rope_theta`` / ``model.rope_scaling``, for every RoPE family.

Reads both HF layouts: transformers 4 (``rope_theta`` + ``rope_scaling``) and 5
(``rope_parameters`` holding ``rope_theta``); where both are given ``rope_scaling`` wins, as in
transformers. Exports both, so either major version loads the result. The scaling semantics are
those of ``tessera.layers.positions`` (transformers 5's); parameters it does not implement
(yarn's ``attention_factor``, ``mscale`` outside the DeepSeek families, partial rotary,
per-layer-type RoPE) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError

DEFAULT_THETA = 10000.0

# HF rope_type -> the scaling keys tessera reads for it (model.rope_scaling fields).
KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"),
    "llama3": (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ),
}

# Keys HF reads that change the math and that tessera does not implement: key -> the one
# value that is harmless.
UNSUPPORTED = {
    "attention_factor": None,
    "mscale": None,
    "mscale_all_dim": None,
    "truncate": True,
    "partial_rotary_factor": 1.0,
}


def _parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ConversionError(
            f"RoPE parameters per layer type ({sorted(params)}) are not supported"
        )
    params.update(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", DEFAULT_THETA))
    if "partial_rotary_factor" in hf:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    return params


# DeepSeek's yarn: mscale / mscale_all_dim scale the cos/sin table and the softmax (MLA).
DEEPSEEK_YARN = ("mscale", "mscale_all_dim")


class Rope:
    """The RoPE part of a family's config table. ``deepseek_mscale``: yarn's ``mscale`` and
    ``mscale_all_dim`` are read into ``model.rope_scaling`` (0 = absent) rather than refused."""

    def __init__(self, deepseek_mscale: bool = False):
        self.deepseek_mscale = deepseek_mscale

    def _extra(self, kind: str) -> tuple[str, ...]:
        return DEEPSEEK_YARN if self.deepseek_mscale and kind == "yarn" else ()

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        params = _parameters(hf)
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind not in KEYS:
            raise ConversionError(
                f"rope_type {kind!r} is not supported; supported: {', '.join(KEYS)}"
            )
        for key, harmless in UNSUPPORTED.items():
            value = params.get(key, harmless)
            if value != harmless and key not in self._extra(kind):
                raise ConversionError(f"RoPE parameter {key}={value!r} is not supported")
        out: dict[str, Any] = {
            "rope_theta": float(params["rope_theta"]),
            "rope_scaling.type": "none" if kind == "default" else kind,
        }
        max_position = hf.get("max_position_embeddings")
        for key in KEYS[kind]:
            value = params.get(key)
            if value is None and key == "original_max_position_embeddings":
                value = max_position
            if value is None and kind == "yarn":
                value = {"beta_fast": 32.0, "beta_slow": 1.0}.get(key)
                if key == "factor" and max_position and params.get(
                    "original_max_position_embeddings"
                ):
                    value = max_position / params["original_max_position_embeddings"]
            if value is None:
                raise ConversionError(f"rope_type {kind!r} needs {key!r} in its RoPE parameters")
            out[f"rope_scaling.{key}"] = value
        for key in self._extra(kind):
            out[f"rope_scaling.{key}"] = float(params.get(key) or 0.0)
        return out

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        theta = float(model.rope_theta)
        kind = model.rope_scaling.type
        kind = "default" if kind == "none" else kind
        if kind not in KEYS:
            raise ConversionError(f"rope scaling type {kind!r} has no Hugging Face equivalent")
        scaling = {"rope_type": kind}
        for key in KEYS[kind]:
            value = model.rope_scaling[key]
            if key == "original_max_position_embeddings":
                value = int(value) or int(model.max_seq_len)
            scaling[key] = value
        for key in self._extra(kind):
            if float(model.rope_scaling[key]):
                scaling[key] = float(model.rope_scaling[key])
        return {
            "rope_theta": theta,
            "rope_scaling": None if kind == "default" else scaling,
            "rope_parameters": {**scaling, "rope_theta": theta},
        }
