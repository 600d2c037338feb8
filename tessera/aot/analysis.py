"""What a compiled program says about itself: HBM per device, XLA's cost, collectives.

All figures are per device (XLA compiles one SPMD program that every device runs) except where
a name says otherwise. XLA's ``cost_analysis()`` counts the body of a loop once, whatever its
trip count: ``predict.py`` turns these into per-step figures.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

COLLECTIVES = (
    "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
    "collective-permute",
)
# `%name = <shape> <op>(` or `<op>-start(`; `-done` ops carry no new data.
_OP = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5}


@dataclasses.dataclass
class Memory:
    """Bytes per device of a compiled program."""

    argument: int
    output: int
    alias: int  # outputs that reuse a donated argument's buffer
    temp: int
    code: int  # the program binary

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code

    def as_dict(self) -> dict[str, int]:
        return {
            "argument_bytes": self.argument, "output_bytes": self.output,
            "alias_bytes": self.alias, "temp_bytes": self.temp, "code_bytes": self.code,
            "total_bytes": self.total,
        }


def memory(compiled: Any) -> Memory:
    m = compiled.memory_analysis()
    return Memory(
        argument=int(m.argument_size_in_bytes),
        output=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        temp=int(m.temp_size_in_bytes),
        code=int(m.generated_code_size_in_bytes),
    )


# libtpu's cost model (0.0.52) prices every ``ConcatBitcast`` custom call at exactly -1 s. The
# v6e compiler emits them where it stages a buffer through on-chip memory (async slices joined by
# a ConcatBitcast), so a real program's ``optimal_seconds`` came out negative: measured on a
# one-layer Llama train step on v6e-1 / v6e-8, ``optimal_seconds`` was -13.966 / -15.987 / -16.966
# with 14 / 16 / 17 ConcatBitcast calls in the optimized HLO, and an optax global-norm clip alone
# was -0.99988 with one. ``cost`` adds 1 s back per call, so such an op costs 0 (it joins slices
# whose copies XLA prices on their own) and the rest of the program keeps XLA's estimate.
_UNCOSTED = re.compile(r'custom_call_target="ConcatBitcast"')


def uncosted_ops(hlo_text: str) -> int:
    """Custom calls in optimized TPU HLO that libtpu's cost model prices at -1 s each."""
    return len(_UNCOSTED.findall(hlo_text))


def cost(compiled: Any, hlo_text: str | None = None) -> dict[str, float]:
    """XLA's ``flops``, ``bytes accessed`` and ``optimal_seconds`` (loop bodies counted once),
    with ``optimal_seconds`` corrected for libtpu's -1 s per ``ConcatBitcast`` (see
    ``uncosted_ops``): ``raw_optimal_seconds`` is XLA's figure, ``uncosted_ops`` the count.
    ``hlo_text``: the compiled program's text, when the caller has it already."""
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):  # older jax: one dict per program
        ca = ca[0]
    raw = float(ca.get("optimal_seconds", float("nan")))
    n = uncosted_ops(hlo_text if hlo_text is not None else compiled.as_text())
    return {
        "flops": float(ca.get("flops", 0.0)),
        "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
        "optimal_seconds": raw + n,
        "raw_optimal_seconds": raw,
        "uncosted_ops": float(n),
    }


def _itemsize(dtype: str) -> float:
    if dtype in _ITEMSIZE:
        return _ITEMSIZE[dtype]
    bits = re.search(r"(\d+)", dtype)
    return int(bits.group(1)) / 8 if bits else 0.0


def _largest_array_bytes(shape: str) -> float:
    """Bytes of the largest array in an HLO shape (a tuple for async ``-start`` ops)."""
    best = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        best = max(best, n * _itemsize(dtype))
    return best


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """Collectives in optimized HLO by kind: ``{"all-gather": {"count", "bytes"}}``, bytes of
    each op's result per device. Static occurrences: an op in a loop body counts once."""
    out = {k: {"count": 0, "bytes": 0.0} for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m:
            entry = out[m.group("op")]
            entry["count"] += 1
            entry["bytes"] += _largest_array_bytes(m.group("shape"))
    return {k: v for k, v in out.items() if v["count"]}


_MOSAIC = re.compile(r'%(?P<name>[\w\-]+?)(?:\.\d+)* = .*custom_call_target="tpu_custom_call"')


def pallas_kernels(hlo_text: str) -> dict[str, int]:
    """Pallas (Mosaic) kernels in optimized TPU HLO by name (``{"splash_mha_fwd": 2}``): which
    fast paths the program really runs. Static occurrences, as for `collectives`."""
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _MOSAIC.search(line)
        if m:
            out[m.group("name")] = out.get(m.group("name"), 0) + 1
    return out


def extrapolate(one: float, two: float, repeats: float) -> float:
    """A figure of ``repeats`` repeating units from programs with one and two units:
    ``one + (repeats - 1) * (two - one)``."""
    return float(one + (repeats - 1) * (two - one))


def extrapolate_tree(one: dict, two: dict, repeats: float) -> dict:
    """``extrapolate`` over matching nested dicts of numbers (a key missing on one side is 0)."""
    out = {}
    for key in sorted(set(one) | set(two)):
        a, b = one.get(key, 0.0), two.get(key, 0.0)
        if isinstance(a, dict) or isinstance(b, dict):
            out[key] = extrapolate_tree(a or {}, b or {}, repeats)
        else:
            out[key] = extrapolate(float(a), float(b), repeats)
    return out


def nan_to_none(x: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None, numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [nan_to_none(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
