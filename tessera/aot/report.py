"""The report of ``python -m tessera.aot``: one dict (``--json``) and its printed form."""

from __future__ import annotations

from typing import Any

from tessera.aot.analysis import Memory
from tessera.aot.compile import DoesNotFitError, Target
from tessera.bench.table import print_table
from tessera.configs.base import ConfigDict

GB = 1e9
GiB = 1024**3


def hbm(memory: Memory, target: Target) -> dict[str, Any]:
    capacity = target.hbm_per_device
    return {
        **memory.as_dict(),
        "capacity_bytes": capacity,
        "fits": memory.total <= capacity,
        "margin_bytes": capacity - memory.total,
    }


def train_report(
    config_name: str, config: ConfigDict, target: Target, compiled: dict,
    predicted: dict | None, causal_saving: float,
) -> dict[str, Any]:
    """``causal_saving``: forward FLOPs per step the causal-half convention drops."""
    n = len(target.devices)
    analytic = compiled["analytic_flops_per_step"]
    report: dict[str, Any] = {
        "program": "train_step",
        "config": config_name,
        "family": config.model.family,
        "params": compiled["params"],
        "topology": target.topology.name,
        "device_kind": target.devices[0].device_kind,
        "chips": target.topology.chips,
        "devices": n,
        "mesh": compiled["mesh"],
        "global_batch": int(config.data.global_batch_size),
        "example": _example(config),
        "remat": config.model.remat,
        "compile_seconds": compiled["compile_seconds"],
        "hbm": hbm(compiled["memory"], target),
        "xla": {**compiled["xla"], "note": "raw: every loop body counted once"},
        "collectives_static": compiled["collectives"],
        "kernels": compiled["kernels"],
        "analytic_flops_per_step": analytic,
        "analytic_flops_per_step_causal": (
            None if analytic is None else analytic - 3.0 * causal_saving
        ),
        "peak_flops_per_device": target.peak_flops_per_device,
    }
    if predicted is not None:
        t = predicted["step_seconds"]
        unit, units = compiled["throughput"]
        peak = t * n * target.peak_flops_per_device
        mfu = lambda flops: None if flops is None else flops / peak
        report["predicted"] = {
            **predicted,
            "flops_per_step": predicted["flops_per_step_xla"],
            "mfu": mfu(analytic),
            "mfu_causal": mfu(report["analytic_flops_per_step_causal"]),
            f"{unit}_per_second_per_device": units / t / n,
        }
    return report


def decode_step(compiled: dict, target: Target, predicted: dict | None) -> dict[str, Any]:
    """One decode step (a new token for each row of the batch) against the HBM roofline: the
    bytes a step must read per device (parameters + the cache in full + the rest of the decode
    state) over the chip's HBM bandwidth per device, and ``predicted`` (``predict_decode``)."""
    read = compiled["decode_bytes"]
    total = read["params"] + read["cache"] + read["state"]
    bandwidth = target.hbm_bandwidth_per_device
    out: dict[str, Any] = {
        "layers_scanned": compiled["layers_scanned"],
        "decode_chunk": compiled["decode_chunk"],
        "roofline_bytes_per_device": {**read, "total": total},
        "hbm_bandwidth_per_device": bandwidth,
        "roofline_seconds": total / bandwidth,
    }
    if predicted is not None:
        t = predicted["step_seconds"]
        rows = compiled["shape"]["batch"]
        out["predicted"] = {
            **predicted,
            "ratio_to_roofline": t / out["roofline_seconds"],
            "tokens_per_second_per_row": 1.0 / t,
            "tokens_per_second": rows / t,
            "tokens_per_second_per_chip": rows / t / target.topology.chips,
        }
    return out


def decode_report(
    config_name: str, config: ConfigDict, target: Target, compiled: dict,
    predicted: dict | None = None,
) -> dict[str, Any]:
    """The decode report: both programs' memory and raw cost, and ``decode_step`` (roofline
    always, the predicted step time when ``predicted`` is given)."""
    programs = {
        name: {
            "hbm": hbm(compiled[name]["memory"], target),
            "xla": compiled[name]["xla"],
            "collectives_static": compiled[name]["collectives"],
            "kernels": compiled[name]["kernels"],
            "compile_seconds": compiled[name]["compile_seconds"],
        }
        for name in ("prefill", "decode")
    }
    return {
        "program": "decode",
        "config": config_name,
        "family": config.model.family,
        "topology": target.topology.name,
        "device_kind": target.devices[0].device_kind,
        "chips": target.topology.chips,
        "devices": len(target.devices),
        "mesh": compiled["mesh"],
        "request": compiled["shape"],
        "param_dtype": str(config.model.param_dtype),
        "dtype": str(config.model.dtype),
        "cache_bytes_total": compiled["cache_bytes"],
        **programs,
        "decode_step": decode_step(compiled, target, predicted),
        "hbm": max((p["hbm"] for p in programs.values()), key=lambda h: h["total_bytes"]),
    }


def refused_report(config_name: str, target: Target, error: DoesNotFitError) -> dict[str, Any]:
    """The report when XLA refused to compile because the program exceeds HBM."""
    return {
        "program": error.program,
        "config": config_name,
        "topology": target.topology.name,
        "device_kind": target.devices[0].device_kind,
        "chips": target.topology.chips,
        "devices": len(target.devices),
        "hbm": {
            "fits": False,
            "capacity_bytes": target.hbm_per_device,
            "needed_bytes": error.needed,
            "available_bytes": error.available,
            "detail": error.detail,
        },
    }


def refused_line(r: dict) -> str:
    return (
        f"does not fit: {r['config']} {r['program']} on {r['topology']}: XLA refused to "
        f"compile it: {r['hbm']['detail']}"
    )


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _size(x: float, unit: int) -> str:
    return f"{x / unit:.2f}" if unit == GiB else f"{x / unit:.1f}"


def _mesh(mesh: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.items() if v != 1) or "one device"


def _memory_rows(h: dict) -> list[dict]:
    unit, name = (GiB, "GiB") if h["total_bytes"] >= GiB / 4 else (1024**2, "MiB")
    rows = [
        ("arguments", h["argument_bytes"]),
        ("outputs", h["output_bytes"]),
        ("donated (aliased)", -h["alias_bytes"]),
        ("temporaries", h["temp_bytes"]),
        ("program", h["code_bytes"]),
        ("total", h["total_bytes"]),
        ("capacity", h["capacity_bytes"]),
    ]
    return [{"HBM per device": k, name: _size(v, unit)} for k, v in rows]


def kernels_line(kernels: dict[str, int]) -> str:
    """Which Pallas kernels the program runs (or that it runs none: XLA code only)."""
    if not kernels:
        return "Pallas kernels: none (XLA code only)"
    listed = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in sorted(kernels.items()))
    return f"Pallas kernels in the program: {listed}"


def fit_line(h: dict) -> str:
    used = h["total_bytes"] / h["capacity_bytes"]
    if h["fits"]:
        return (
            f"fits: {_gib(h['total_bytes'])} of {_gib(h['capacity_bytes'])} GiB per device "
            f"({used:.0%}), {_gib(h['margin_bytes'])} GiB spare"
        )
    return (
        f"does not fit: needs {_gib(h['total_bytes'])} GiB per device, the chip has "
        f"{_gib(h['capacity_bytes'])} GiB ({_gib(-h['margin_bytes'])} GiB over)"
    )


def _collective_rows(coll: dict, per: str) -> list[dict]:
    return [
        {
            "collective": k,
            f"ops {per}": f"{v['count']:.0f}",
            "GB per device": f"{v['bytes'] / GB:.3f}",
        }
        for k, v in sorted(coll.items())
    ]


def _example(config: Any) -> str:
    """What one example of the batch is: ``4096 tokens`` or ``224x224x3 image``."""
    m = config.model
    if m.name in ("vit", "vae"):
        return f"{m.image_size}x{m.image_size}x{m.num_channels} image"
    if m.name in ("unet", "dit"):
        return f"{m.image_size}x{m.image_size}x{m.num_channels} latent"
    return f"{int(config.data.seq_len)} tokens"


def print_train(r: dict) -> None:
    print(
        f"tessera.aot: {r['config']} train step on {r['topology']} ({r['chips']} chips, "
        f"{r['devices']} devices, {r['device_kind']}); mesh {_mesh(r['mesh'])}; "
        f"batch {r['global_batch']} x {r['example']} "
        f"({r['global_batch'] / r['devices']:g} per device); remat {r['remat']}; "
        f"{r['params'] / 1e9:.2f}B params; compiled in {r['compile_seconds']:.1f} s"
    )
    print()
    print_table(_memory_rows(r["hbm"]))
    print(fit_line(r["hbm"]))
    print(kernels_line(r["kernels"]))
    print()
    rows = []
    if r["analytic_flops_per_step"] is not None:
        rows.append({"FLOPs per step (all devices)": "analytic, attention T x T in full",
                     "value": f"{r['analytic_flops_per_step']:.4g}"})
        rows.append({"FLOPs per step (all devices)": "analytic, causal half (MaxText's)",
                     "value": f"{r['analytic_flops_per_step_causal']:.4g}"})
    p = r.get("predicted")
    if p is not None:
        ratio = ""
        if r["analytic_flops_per_step"]:
            ratio = f" ({p['flops_per_step'] / r['analytic_flops_per_step']:.3f} x analytic)"
        rows.append({"FLOPs per step (all devices)": "XLA, per step (extrapolated)",
                     "value": f"{p['flops_per_step']:.4g}{ratio}"})
    rows.append({"FLOPs per step (all devices)": "XLA raw (loop bodies once), x devices",
                 "value": f"{r['xla']['flops'] * r['devices']:.4g}"})
    rows.append({"FLOPs per step (all devices)": "XLA raw optimal_seconds",
                 "value": f"{r['xla']['optimal_seconds']:.4g}"})
    print_table(rows)
    print()
    if p is None:
        print("predicted step time: skipped (--no-predict)")
        return
    unit_rate = next(k for k in p if k.endswith("_per_second_per_device"))
    print(f"predicted step time: {p['step_seconds']:.4g} s ({p['method']})")
    print(
        f"  (roofline of the same programs, max(FLOPs / peak, bytes / HBM bandwidth): "
        f"{p['roofline_seconds']:.4g} s)"
    )
    if p["mfu"] is not None:
        same = abs(p["mfu"] - p["mfu_causal"]) < 5e-4
        causal = "" if same else f"; {p['mfu_causal']:.1%} counting the causal half (MaxText)"
        print(
            f"predicted MFU: {p['mfu']:.1%} counting attention's T x T block in full{causal}; "
            f"peak {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device"
        )
    print(f"predicted {unit_rate.replace('_', ' ')}: {p[unit_rate]:,.0f}")
    if p["collectives"]:
        print()
        print_table(_collective_rows(p["collectives"], "per step"))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _bytes(x: float) -> str:
    """GB for figures of 0.1 GB and up, MB from 0.1 MB, else kB (decimal, as bandwidths)."""
    if x >= 0.1 * GB:
        return f"{x / GB:.3f} GB"
    return f"{x / 1e6:.3f} MB" if x >= 1e5 else f"{x / 1e3:.3f} kB"


def print_decode(r: dict) -> None:
    q = r["request"]
    print(
        f"tessera.aot: {r['config']} decode on {r['topology']} ({r['chips']} chips, "
        f"{r['devices']} devices, {r['device_kind']}); mesh {_mesh(r['mesh'])}; batch "
        f"{q['batch']}, prompt bucket {q['length']}, cache {q['max_len']} slots "
        f"({r['cache_bytes_total'] / GB:.3f} GB over all devices); parameters "
        f"{r['param_dtype']}, compute {r['dtype']}"
    )
    d = r["decode_step"]
    for name in ("prefill", "decode"):
        p = r[name]
        counted = "loop bodies counted once"
        if name == "decode":
            counted = (
                "one step, with a scanned layer stack's body (one unit) counted once"
                if d["layers_scanned"] else "one step with every layer, plus the call's set-up"
            )
        print()
        print(f"{name} (compiled in {p['compile_seconds']:.1f} s; XLA raw: "
              f"{p['xla']['flops']:.4g} FLOPs, {p['xla']['bytes_accessed'] / GB:.4g} GB, "
              f"{p['xla']['optimal_seconds']:.4g} s: {counted})")
        print_table(_memory_rows(p["hbm"]))
        print(fit_line(p["hbm"]))
        print(kernels_line(p["kernels"]))
        if p["collectives_static"]:
            print_table(_collective_rows(p["collectives_static"], "in the program"))
    print_decode_step(r)


def print_decode_step(r: dict) -> None:
    """The decode step's roofline and predicted time (a token for each row of the batch)."""
    d = r["decode_step"]
    b = d["roofline_bytes_per_device"]
    print()
    print(
        f"decode step (one token for each of the {r['request']['batch']} rows), per device: "
        f"HBM roofline {_ms(d['roofline_seconds'])} = ({_bytes(b['params'])} parameters + "
        f"{_bytes(b['cache'])} cache, read in full + {_bytes(b['state'])} other state) / "
        f"{d['hbm_bandwidth_per_device'] / GB:.0f} GB/s"
    )
    gathered = r["decode"]["collectives_static"].get("all-gather", {}).get("bytes", 0.0)
    if gathered >= 0.1 * b["params"]:
        print(
            f"  note: the decode program all-gathers {_bytes(gathered)} per device (static count: "
            "parameters sharded over an axis the batch is split on, e.g. fsdp), so each device "
            "also reads gathered parameters and the step cannot reach this roofline; "
            "--config.mesh.tensor=N shards the parameters without gathering them"
        )
    p = d.get("predicted")
    if p is None:
        print("predicted step time: skipped (--no-predict)")
        return
    print(
        f"predicted step time: {_ms(p['step_seconds'])} = {p['ratio_to_roofline']:.2f} x the "
        f"roofline (XLA: {_bytes(p['bytes_per_device'])}, {p['flops_per_device']:.4g} "
        f"FLOPs per device per step)"
    )
    print(f"  method: {p['method']}")
    print(
        f"  => {p['tokens_per_second_per_row']:,.1f} tokens/s per row, "
        f"{p['tokens_per_second']:,.0f} tokens/s for the batch "
        f"({p['tokens_per_second_per_chip']:,.1f} per chip); the decode loop runs "
        f"{d['decode_chunk']} steps per call, layers "
        f"{'scanned' if d['layers_scanned'] else 'unrolled'}"
    )
