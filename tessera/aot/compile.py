"""Compile tessera's real programs for a TPU topology and report fit, cost and a predicted time.

``compile_train`` compiles the Trainer's step (real parameter, optimizer-state and batch
shardings) for the topology's devices; ``compile_decode`` the Decoder's prefill and decode loop.
Nothing is allocated: inputs are shape/dtype/sharding structs.

Predicted step time ("unrolled 1/2-unit extrapolation"): XLA's ``cost_analysis()`` counts a loop
body once (the layer scan, attention's tile loops, the SSM chunk loops, gradient accumulation),
so the scanned program's ``optimal_seconds`` is not a step time. Two more programs are compiled
with the same mesh, shardings, per-step batch and remat: unscanned layers, one and two repeats of
the layout's unit (plus the prefix), every kernel loop unrolled (``kernels.loops.unrolled``),
one micro-batch, and XLA's windowed einsums off (``COST_COMPILER_OPTIONS``: they are loops too).
Their difference is one unit's cost; ``T = T1 + (units - 1)(T2 - T1)``, times the accumulation
steps. ``optimal_seconds`` is XLA's own per-op estimate (FLOPs against the chip's peak, bytes
against its HBM bandwidth); it is a model, not a measurement: the README compares it with
published step times.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import tempfile
import time
from typing import Any

from tessera.aot import analysis
from tessera.aot.topology import Topology, topology_devices
from tessera.configs.base import ConfigDict


@dataclasses.dataclass
class Target:
    """The devices of a topology and what each holds."""

    topology: Topology
    devices: list

    @property
    def devices_per_chip(self) -> int:
        return max(1, len(self.devices) // self.topology.chips)

    @property
    def hbm_per_device(self) -> float:
        return self.topology.chip.hbm_bytes / self.devices_per_chip

    @property
    def peak_flops_per_device(self) -> float:
        return self.topology.chip.peak_flops / self.devices_per_chip

    @property
    def hbm_bandwidth_per_device(self) -> float:
        return self.topology.chip.hbm_bandwidth / self.devices_per_chip


def make_target(topology: Topology) -> Target:
    return Target(topology, topology_devices(topology))


def with_overrides(config: ConfigDict, **sections: dict[str, Any]) -> ConfigDict:
    """A copy of ``config`` with ``section={key: value}`` updates (it stays locked)."""
    out = copy.deepcopy(config)
    with out.unlocked():
        for section, values in sections.items():
            out[section].update(values)
    return out


def set_per_device_batch(config: ConfigDict, per_device: int, devices: int) -> ConfigDict:
    if per_device < 1:
        raise ValueError(f"per_device_batch must be >= 1, got {per_device}")
    return with_overrides(config, data={"global_batch_size": per_device * devices})


def _unrolled():
    from tessera.kernels import loops

    return loops.unrolled()


class DoesNotFitError(Exception):
    """XLA refused to compile because the program's buffers exceed the chip's HBM."""

    def __init__(self, program: str, detail: str, needed: float | None, available: float | None):
        super().__init__(f"{program}: {detail}")
        self.program, self.detail, self.needed, self.available = (
            program, detail, needed, available
        )


_SIZE = r"\(([0-9.]+)([KMGT]?)\)"
_OOM = re.compile(rf"Ran out of memory.*?{_SIZE}.*?{_SIZE}")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def does_not_fit(name: str, error: Exception) -> DoesNotFitError | None:
    """``error`` (from compiling program ``name``) as a `DoesNotFitError` with XLA's figures
    when it is XLA's out-of-HBM refusal, else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    line = next((x for x in text.splitlines() if "Ran out of memory" in x), text.splitlines()[0])
    if re.search(r"memory space (?!hbm)\w+", line):  # on-chip scratch (vmem, smem): XLA's own
        return None  # fusion plan failed, the program may well fit in HBM
    detail = line.split("E1000: ", 1)[-1].split("HLO module")[0].strip()
    m = _OOM.search(line)
    if m is None:
        return DoesNotFitError(name, detail, None, None)
    needed = float(m.group(1)) * _UNITS[m.group(2)]
    available = float(m.group(3)) * _UNITS[m.group(4)]
    return DoesNotFitError(name, detail, needed, available)


# The cost programs turn off XLA's windowed einsums (FSDP's all-gather / reduce-scatter
# decomposed into a loop of collective-permutes and partial matmuls), whose loops the cost
# analysis would count once: measured on a 1-layer Llama-2-7B program on v5p-64, XLA's FLOPs
# were 0.67x the analytic count with them and 1.16x (full remat's recompute) without.
COST_COMPILER_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
    "xla_tpu_decompose_all_gather_einsum": False,
    "xla_tpu_decompose_einsum_reduce_scatter": False,
}


def _compile(
    lowered: Any, dump_hlo: str | None, name: str, options: dict | None = None
) -> tuple[Any, float]:
    """Compile; XLA's out-of-HBM refusal becomes ``DoesNotFitError`` with its figures."""
    t0 = time.perf_counter()
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, f"{name}.before_optimizations.hlo"), "w") as f:
            f.write(lowered.as_text())
    try:
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:
        oom = does_not_fit(name, e)
        if oom is None:
            raise
        raise oom from None
    seconds = time.perf_counter() - t0
    if dump_hlo:
        with open(os.path.join(dump_hlo, f"{name}.optimized.hlo"), "w") as f:
            f.write(compiled.as_text())
    return compiled, seconds


def _trainer(config: ConfigDict, devices: list):
    from tessera.train.trainer import Trainer

    return Trainer(config, tempfile.mkdtemp(prefix="tessera-aot-"), devices)


def _program_report(compiled: Any, seconds: float) -> dict:
    text = compiled.as_text()
    return {
        "memory": analysis.memory(compiled),
        "xla": analysis.cost(compiled, text),
        "collectives": analysis.collectives(text),
        "kernels": analysis.pallas_kernels(text),
        "compile_seconds": seconds,
    }


def compile_train(config: ConfigDict, target: Target, dump_hlo: str | None = None) -> dict:
    """The real train step compiled for ``target``: memory, raw XLA cost, collectives, mesh."""
    trainer = _trainer(config, target.devices)
    compiled, seconds = _compile(trainer.lower(), dump_hlo, "train_step")
    report = _program_report(compiled, seconds)
    report["mesh"] = {k: int(v) for k, v in trainer.mesh.shape.items()}
    report["params"] = trainer.spec.num_params()
    report["analytic_flops_per_step"] = trainer.flops_per_step
    report["throughput"] = trainer.throughput
    return report


def unit_counts(model: ConfigDict) -> tuple[int, int, int]:
    """(prefix blocks, blocks per unit, unit repeats) of the model's layout."""
    from tessera.models.layout import parse_layout

    layout = parse_layout(model)
    return len(layout.prefix), len(layout.pattern), layout.repeats


def _cost_program(lowered: Any, name: str, target: Target) -> tuple[str, dict, float]:
    """Compile a cost program (``COST_COMPILER_OPTIONS``): (optimized HLO text, XLA's cost with
    ``roofline_seconds`` = max(FLOPs / peak, bytes / HBM bandwidth) added, compile seconds)."""
    compiled, seconds = _compile(lowered, None, name, COST_COMPILER_OPTIONS)
    text = compiled.as_text()
    cost = analysis.cost(compiled, text)
    cost["roofline_seconds"] = max(
        cost["flops"] / target.peak_flops_per_device,
        cost["bytes_accessed"] / target.hbm_bandwidth_per_device,
    )
    return text, cost, seconds


def predict_train(config: ConfigDict, target: Target) -> dict:
    """Per-step XLA cost and collectives by the unrolled 1/2-unit extrapolation (module doc)."""
    prefix, unit, repeats = unit_counts(config.model)
    accum = int(config.optim.grad_accum_steps)
    micro_batch = config.data.global_batch_size // accum
    figures, seconds = [], 0.0
    for r in (1, 2):
        cfg = with_overrides(
            config,
            model={"num_layers": prefix + r * unit, "scan_layers": False},
            optim={"grad_accum_steps": 1},
            data={"global_batch_size": micro_batch},
        )
        with _unrolled():
            lowered = _trainer(cfg, target.devices).lower()
        text, cost, s = _cost_program(lowered, f"cost_{r}", target)
        seconds += s
        figures.append({"xla": cost, "collectives": analysis.collectives(text)})
    step = analysis.extrapolate_tree(figures[0], figures[1], repeats)
    step = {k: _scale(v, accum) for k, v in step.items()}
    # Should libtpu's cost model still give no estimate (optimal_seconds <= 0 after the
    # ConcatBitcast correction), the roofline of the same programs stands in, and says so.
    estimated = all(f["xla"]["optimal_seconds"] > 0 for f in figures)
    source = (
        "XLA optimal_seconds" + _uncosted_note([f["xla"] for f in figures]) if estimated
        else "roofline max(FLOPs / peak, bytes / HBM bandwidth) (XLA gave no optimal_seconds)"
    )
    return {
        "method": (
            f"{source} of unscanned programs with 1 and 2 repeats of the layer unit "
            f"({unit} block{'s' if unit > 1 else ''}), kernel loops unrolled, extrapolated to "
            f"{repeats} repeats" + (f", times {accum} micro-batches" if accum > 1 else "")
            + "; windowed einsums off so that no XLA loop hides FLOPs"
        ),
        "step_seconds": step["xla"]["optimal_seconds" if estimated else "roofline_seconds"],
        "xla_optimal_seconds": step["xla"]["optimal_seconds"] if estimated else None,
        "roofline_seconds": step["xla"]["roofline_seconds"],
        "flops_per_step_xla": step["xla"]["flops"] * len(target.devices),
        "bytes_per_device": step["xla"]["bytes_accessed"],
        "collectives": step["collectives"],
        "compile_seconds": seconds,
    }


def _uncosted_note(costs: list[dict]) -> str:
    """How the cost programs' ``optimal_seconds`` were corrected (``analysis.uncosted_ops``)."""
    counts = [int(c.get("uncosted_ops", 0)) for c in costs]
    if not any(counts):
        return ""
    return (
        f" (plus 1 s per ConcatBitcast call, which libtpu prices at -1 s: "
        f"{' / '.join(map(str, counts))} in the cost programs)"
    )


def _scale(tree: dict, factor: float) -> dict:
    return {k: _scale(v, factor) if isinstance(v, dict) else v * factor for k, v in tree.items()}


def _shard_bytes(tree: Any, shardings: Any) -> float:
    """Bytes per device of the arrays of ``tree`` (shape / dtype leaves) under ``shardings``
    (a matching tree): each device's shard (a whole array where the sharding is None)."""
    import jax
    import numpy as np

    leaves = jax.tree.leaves(tree)
    sh = jax.tree.leaves(shardings, is_leaf=lambda x: x is None)  # None: jax kept no sharding
    return float(sum(
        math.prod(tuple(a.shape) if s is None else s.shard_shape(tuple(a.shape)))
        * np.dtype(a.dtype).itemsize
        for a, s in zip(leaves, sh, strict=True)
    ))


def decode_bytes(compiled: Any) -> dict[str, float]:
    """What one step of the compiled decode program reads at least, per device: its parameters,
    its cache (every cache array in full: KV / latent / recurrent state and the slot positions)
    and the rest of its arguments (per-row state, sampling key)."""
    (params, state, *rest), _ = compiled.args_info
    (p_sh, s_sh, *rest_sh), _ = compiled.input_shardings
    out = {"params": _shard_bytes(params, p_sh)}
    if isinstance(state, dict) and "cache" in state:
        out["cache"] = _shard_bytes(state["cache"], s_sh["cache"])
        others = {k: v for k, v in state.items() if k != "cache"}
        out["state"] = _shard_bytes(
            (others, rest), ({k: v for k, v in s_sh.items() if k != "cache"}, rest_sh)
        )
    else:
        out["cache"] = 0.0
        out["state"] = _shard_bytes((state, rest), (s_sh, rest_sh))
    return out


def compile_decode(
    config: ConfigDict, target: Target, batch: int, prompt_len: int, max_new_tokens: int,
    dump_hlo: str | None = None,
) -> dict:
    """The Decoder's prefill and decode-loop programs for ``target``, per program a report as
    ``compile_train``'s, plus the request shape they were compiled at, the bytes per device a
    decode step reads (``decode_bytes``), the Decoder's ``decode_chunk`` and whether its decode
    program scans the layer stack."""
    from tessera.models.create import ModelSpec
    from tessera.serve.engine import Decoder
    from tessera.sharding import make_mesh

    mesh = make_mesh(config.mesh, target.devices)
    decoder = Decoder(ModelSpec(config.model), None, mesh, config.mesh.rules)
    shape = decoder.request_shape(batch, prompt_len, max_new_tokens)
    out: dict[str, Any] = {"shape": shape, "mesh": {k: int(v) for k, v in mesh.shape.items()}}
    out["cache_bytes"] = decoder.cache_info(shape["batch"], shape["max_len"]).bytes
    # The Decoder may run a scanned config's stack unrolled (its own spec says which).
    out["layers_scanned"] = bool(decoder.spec.cfg.get("scan_layers", False))
    out["decode_chunk"] = int(decoder.decode_chunk)
    for name, lowered in decoder.lower(batch, prompt_len, max_new_tokens).items():
        compiled, seconds = _compile(lowered, dump_hlo, f"decode_{name}")
        out[name] = _program_report(compiled, seconds)
        if name == "decode":
            out["decode_bytes"] = decode_bytes(compiled)
    return out


def predict_decode(
    config: ConfigDict, target: Target, batch: int, prompt_len: int, max_new_tokens: int,
    decode_chunk: int,
) -> dict:
    """XLA's cost of one decode step (one new token for each row) of a Decoder running
    ``decode_chunk`` steps per call: "one-step programs".

    The decode program is a ``while_loop`` of one-token steps and XLA's ``cost_analysis``
    counts its body once; a scanned layer stack inside it is counted once more (one unit per
    step), kernel tile loops likewise. So the figures come from cost programs, compiled as the
    Decoder compiles its decode program for the same request and mesh, but with
    ``decode_chunk=1``, the layers unrolled (``scan_layers=False``: every layer is in the
    program however the real one runs them), kernel loops unrolled and windowed einsums off:
    XLA's cost of such a program is one call of one step. A call also holds work XLA hoists out
    of the loop and runs once per call of ``decode_chunk`` steps: with parameters stored in
    another dtype than the compute dtype, their conversion. When the dtypes differ, a second
    cost program stores the parameters in the compute dtype (nothing to convert); the first
    minus the second is that per-call work, and a step costs
    ``second + (first - second) / decode_chunk``.

    Seconds: XLA's ``optimal_seconds``, corrected for libtpu's -1 s per ``ConcatBitcast``
    (``analysis.uncosted_ops``), when it is positive for every cost program; otherwise the
    roofline of the same programs' FLOPs and bytes, ``max(FLOPs / peak, bytes / HBM
    bandwidth)``, stands in (``method`` says which).
    """
    from tessera.layers.base import dtype_of
    from tessera.models.create import ModelSpec
    from tessera.serve.engine import Decoder
    from tessera.sharding import make_mesh

    if decode_chunk < 1:
        raise ValueError(f"decode_chunk must be >= 1, got {decode_chunk}")
    mesh = make_mesh(config.mesh, target.devices)
    m = config.model
    convert = dtype_of(m.param_dtype) != dtype_of(m.dtype)
    variants = [{}] + ([{"param_dtype": m.dtype}] if convert else [])
    costs, seconds = [], 0.0
    for i, extra in enumerate(variants):
        cfg = with_overrides(config, model={"scan_layers": False, **extra})
        decoder = Decoder(ModelSpec(cfg.model), None, mesh, config.mesh.rules, decode_chunk=1)
        with _unrolled():
            lowered = decoder.lower(batch, prompt_len, max_new_tokens)["decode"]
        _, cost, s = _cost_program(lowered, f"decode_cost_{i}", target)
        seconds += s
        costs.append(cost)
    if convert:
        first, second = costs
        step = {k: second[k] + (first[k] - second[k]) / decode_chunk for k in first}
        per_call = {k: first[k] - second[k] for k in first}
    else:
        step, per_call = dict(costs[0]), None
    estimated = all(c["optimal_seconds"] > 0 for c in costs)
    source = (
        "XLA optimal_seconds" + _uncosted_note(costs) if estimated
        else "roofline max(FLOPs / peak, bytes / HBM bandwidth) of XLA's counts (libtpu's "
        "cost model gave optimal_seconds <= 0: "
        + ", ".join(f"{c['optimal_seconds']:.4g}" for c in costs) + ")"
    )
    method = (
        f"{source} of a one-step decode program (decode_chunk=1, layers unrolled, kernel loops "
        "unrolled, windowed einsums off)"
    )
    if convert:
        method += (
            f", minus the {m.param_dtype} -> {m.dtype} parameter conversion XLA runs once per "
            f"call (a second program with {m.dtype} parameters), plus that conversion / "
            f"decode_chunk={decode_chunk}"
        )
    return {
        "method": method,
        "step_seconds": step["optimal_seconds" if estimated else "roofline_seconds"],
        "xla_optimal_seconds": step["optimal_seconds"] if estimated else None,
        "flops_per_device": step["flops"],
        "bytes_per_device": step["bytes_accessed"],
        "per_call_bytes_per_device": None if per_call is None else per_call["bytes_accessed"],
        "cost_programs": costs,
        "compile_seconds": seconds,
    }


@contextlib.contextmanager
def quiet():
    """Silence absl/XLA INFO logs while compiling (the tool prints its own report)."""
    from absl import logging

    old = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(old)
