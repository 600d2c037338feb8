"""The big presets on TPU pods: ``tessera.aot`` for each preset and topology, one markdown table.

For every ``--presets`` x ``--topologies`` pair this runs

  ``<repo>/.venv/bin/python -m tessera.aot --config=PRESET --topology=TOPO --json=WORKDIR/...``

one at a time (each compile is a few GB and minutes of CPU on a 2-core machine), at the preset's
own batch (``data.global_batch_size`` over the devices), sequence, remat and mesh, and prints
per row: HBM per device against the chip's capacity, whether it fits, the predicted step time,
MFU (attention's T x T block in full, and the causal half, MaxText's convention) and tokens per
second per device. ``--reuse`` keeps a row's JSON from an earlier run; ``--no-predict`` skips
the cost programs (fit only); ``--set key=value`` passes a config override to every run.

Usage::

  python tools/aot_presets.py                                   # every big preset, both pods
  python tools/aot_presets.py --presets=llama:8b --topologies=v5p-256 --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The largest preset of each family (and the published Llama shapes); the list first.
BIG_PRESETS = (
    "llama:8b", "llama:70b", "mamba2:2.7b", "mamba:2.8b", "mixtral:8x7b", "qwen_moe:30b_a3b",
    "deepseek:v3", "rwkv6:7b", "rwkv7:7b", "retnet:6.7b", "vit:h14",
)
TOPOLOGIES = ("v5p-256", "v6e-256")
# What a preset needs beyond its own settings to fit a pod, by preset and TPU generation
# (printed in its row). DeepSeek-V3's float32 parameters, gradients and Adam moments alone are
# 10.7 TB, more than v6e-256's 8.8 TB, and on v5p-256 XLA asks for 137 GiB per chip with them;
# in bfloat16 (parameters, gradients and both moments: 8 bytes a parameter) it fits v5p-256
# dropless, and v6e-256 with each expert taking at most 1.25x its even share of a row.
POD_SETTINGS: dict[tuple[str, str], tuple[str, ...]] = {
    ("deepseek:v3", "v5p"): ("model.param_dtype=bfloat16",),
    ("deepseek:v3", "v6e"): ("model.param_dtype=bfloat16", "model.moe.capacity_factor=1.25"),
}


def pod_settings(preset: str, topology: str) -> tuple[str, ...]:
    """``POD_SETTINGS`` of ``preset`` on ``topology`` ("v6e-256": generation v6e)."""
    return POD_SETTINGS.get((preset, topology.split("-")[0].split(":")[0]), ())
GIB = 2**30


def _name(preset: str, topology: str) -> str:
    return f"{preset.replace(':', '_')}@{topology}"


def run_one(args: argparse.Namespace, preset: str, topology: str) -> dict:
    """One ``tessera.aot`` run (or its JSON from an earlier one with ``--reuse``)."""
    out = os.path.join(args.workdir, _name(preset, topology) + ".json")
    log = os.path.join(args.workdir, _name(preset, topology) + ".log")
    if args.reuse and os.path.exists(out):
        print(f"[{preset} {topology}] reusing {out}", flush=True)
        with open(out) as f:
            return json.load(f)
    cmd = [args.python, "-m", "tessera.aot", f"--config={preset}", f"--topology={topology}",
           f"--json={out}"] + (["--no-predict"] if not args.predict else [])
    pod = pod_settings(preset, topology)
    cmd += [f"--config.{s}" for s in [*pod, *(args.set or [])]]
    print(f"[{preset} {topology}] compiling (log {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=args.repo, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc not in (0, 1) or not os.path.exists(out):  # 1: compiled, does not fit
        with open(log) as f:
            tail = f.read().strip().splitlines()[-1:] or ["(no output)"]
        print(f"[{preset} {topology}] failed (exit {rc}) after {wall:.0f} s: {tail[0]}",
              flush=True)
        return {"config": preset, "topology": topology, "error": f"exit {rc}: {tail[0]}"}
    with open(out) as f:
        report = json.load(f)
    report["wall_seconds"] = wall
    report["settings"] = list(pod)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"[{preset} {topology}] done in {wall:.0f} s", flush=True)
    return report


def _mesh(mesh: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.items() if v != 1) or "data=1"


def row(report: dict) -> str:
    """One markdown row of ``table``."""
    head = f"| {report['config']} | {report['topology']} |"
    if "error" in report:
        return head + f" {report['error']} | | | | | |"
    hbm = report["hbm"]
    if "total_bytes" not in hbm:  # XLA refused to compile it (CompileTimeHbmOom)
        need = hbm.get("needed_bytes")
        said = f"XLA: {need / GIB:.0f} GiB of temporaries needed" if need else hbm.get("detail")
        settings = ", ".join(report.get("settings", ()))
        return head + f"{' ' + settings if settings else ''} | {said} | **does not fit** | | | |"
    per_dev = report["global_batch"] / report["devices"]  # MaxText's per_device_batch_size
    shape = f"{per_dev:g} x {report['example'].split()[0]}"
    setup = ", ".join([shape, f"remat {report['remat']}", _mesh(report["mesh"]),
                       *report.get("settings", ())])
    memory = f"{hbm['total_bytes'] / GIB:.1f} / {hbm['capacity_bytes'] / GIB:.0f}"
    if not hbm["fits"]:
        return head + f" {setup} | {memory} | **does not fit** | | | |"
    pred = report.get("predicted") or {}
    if not pred.get("step_seconds"):
        return head + f" {setup} | {memory} | fits | not predicted | | |"
    mfu = f"{100 * pred['mfu']:.1f}%"
    if pred.get("mfu_causal") and abs(pred["mfu_causal"] - pred["mfu"]) > 5e-4:
        mfu += f" / {100 * pred['mfu_causal']:.1f}%"
    rate = pred.get("tokens_per_second_per_device")
    rate = f"{rate:,.0f}" if rate else f"{pred['images_per_second_per_device']:,.0f} images"
    return head + f" {setup} | {memory} | fits | {pred['step_seconds']:.2f} s | {mfu} | {rate} |"


def table(reports: list[dict]) -> str:
    lines = [
        "| preset | topology | batch per device x tokens, remat, mesh | HBM GiB per device "
        "(of capacity) | fit | predicted step | MFU (T x T in full / causal half) | "
        "tokens (images) / s per device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [row(r) for r in reports])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(BIG_PRESETS))
    p.add_argument("--topologies", default=",".join(TOPOLOGIES))
    p.add_argument("--predict", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--set", action="append", help="config override key=value (repeatable)")
    p.add_argument("--reuse", action="store_true", help="keep rows whose JSON exists")
    p.add_argument("--workdir", default="/tmp/aot-presets")
    p.add_argument("--repo", default=REPO, help="tessera checkout whose .venv runs tessera.aot")
    p.add_argument("--python", default=None, help="default: <repo>/.venv/bin/python")
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args(argv)
    args.python = args.python or os.path.join(args.repo, ".venv", "bin", "python")
    if not os.path.exists(args.python):
        print(f"aot_presets: no Python at {args.python}: run `make install` first", file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    reports = [
        run_one(args, preset, topo)
        for preset in args.presets.split(",") for topo in args.topologies.split(",")
    ]
    text = table(reports)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all("error" not in r for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
