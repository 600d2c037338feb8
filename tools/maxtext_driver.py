"""Compile MaxText's train step for a TPU slice ahead of time and write what XLA says as JSON.

Runs only in a side virtualenv that has ``maxtext`` and ``libtpu`` (``tools/compare_maxtext.py``
makes one); never imported by tessera or its tests. No TPU is needed: libtpu's topology
description gives the devices of the slice and the program compiles for them on the CPU.

Two modes:

``compile`` (the default)
    one compile of ``maxtext.trainers.pre_train.train_compile``'s train step, built the way its
    ``main`` builds it (same config parsing, mesh, abstract state, shardings, donation and
    compiler options), keeping the compiled object to read ``memory_analysis()`` and
    ``cost_analysis()``. ``--set key=value`` passes any MaxText config override.

``row``
    everything one comparison row needs, each compile in a child process (one at a time):
      full  the real program (MaxText's defaults for the model: scanned layers, remat, FSDP over
            all chips, the attention it picks): HBM per device
      L1,L2 unscanned at 1 and 2 layers (``scan_layers=False base_num_decoder_layers=N``), same
            batch, sequence, mesh, shardings and remat: T(L) = T1 + (L-1)(T2-T1), the same for
            XLA's flops ("extrapolated unrolled cost"; XLA counts a loop body once, so the
            scanned program's own ``optimal_seconds`` is not a step time)
    ``--cost_attention`` picks the attention the L1/L2 compiles use (default ``dot_product``:
    XLA's cost analysis gives the splash-attention Pallas call no cost, see ``--probe_attention``
    which compiles L1/L2 with both and records the difference).

Example (in the side venv)::

  /tmp/maxtext-venv/bin/python tools/maxtext_driver.py row --model=llama2-7b \
      --topology=v5p-64 --per_device_batch=4 --seq=4096 --json=/tmp/row.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from importlib import metadata

# Peak dense bf16 FLOP/s per chip.
PEAK_BF16 = {"v5p": 459e12, "v6e": 918e12, "v5e": 197e12, "v4": 275e12}


def chip_family(topology: str) -> str:
    """``v5p-64`` -> ``v5p``; ``v5litepod-16`` -> ``v5e``."""
    name = topology.split("-")[0].lower()
    return {"v5litepod": "v5e", "v6": "v6e"}.get(name, name)


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("maxtext", "jax", "jaxlib", "libtpu", "flax", "tokamax"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def analytic_flops(dims: dict, tokens_per_step: int, seq: int) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward = 3x forward), remat not counted.

    Matmul FLOPs are 6 x tokens x matmul weights (q, k, v, o, the gated MLP and the unembedding;
    the embedding lookup is a gather). Attention (QK^T and PV): 12 x tokens x T x heads x
    head_dim x layers with the full T x T score matrix; causal-half counts half of that, which is
    MaxText's own convention (``calculate_tflops_training_per_device``)."""
    d, L, hd = dims["emb_dim"], dims["num_layers"], dims["head_dim"]
    H, kv = dims["heads"], dims["kv_heads"]
    per_layer = d * (H + 2 * kv) * hd + H * hd * d + 3 * d * dims["mlp_dim"]
    weights = L * per_layer + d * dims["vocab_size"]
    matmul = 6.0 * tokens_per_step * weights
    attn_full = 12.0 * tokens_per_step * seq * H * hd * L
    return {
        "matmul_weights": float(weights),
        "matmul": matmul,
        "attention_full": attn_full,
        "attention_causal": attn_full / 2,
        "full": matmul + attn_full,
        "causal": matmul + attn_full / 2,
    }


def while_loops(hlo: str) -> list[dict]:
    """The ``while`` ops of optimized HLO text: trip count (the constant the loop condition
    compares with; None when it is not one constant) and the jax op name they came from."""
    comps = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)
    }
    out = []
    for m in re.finditer(r"= .*? while\(.*?condition=%([\w.\-]+), body=%[\w.\-]+(.*)", hlo):
        consts = re.findall(r"constant\((\d+)\)", comps.get(m.group(1), ""))
        name = re.search(r'op_name="([^"]*)"', m.group(2))
        out.append({
            "trip_count": int(consts[0]) if len(consts) == 1 else None,
            "op_name": name.group(1) if name else "",
        })
    return out


# ---------------------------------------------------------------------------------------------
# compile mode (imports maxtext)


def _maxtext_argv(args: argparse.Namespace) -> list[str]:
    from maxtext import configs

    base = os.path.join(os.path.dirname(configs.__file__), "base.yml")
    kv = {
        "model_name": args.model,
        "compile_topology": args.topology,
        "compile_topology_num_slices": str(args.num_slices),
        "per_device_batch_size": str(args.per_device_batch),
        "max_target_length": str(args.seq),
        "run_name": "tessera_compare",
        "base_output_directory": args.workdir,
        "enable_checkpointing": "false",
        "dataset_type": "synthetic",
    }
    for item in args.set or []:
        key, _, value = item.partition("=")
        kv[key] = value
    return ["train_compile", base] + [f"{k}={v}" for k, v in kv.items()]


def _memory(compiled) -> dict[str, int | None]:
    m = compiled.memory_analysis()

    def get(name):
        v = getattr(m, name, None)
        return None if v is None else int(v)

    out = {
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "alias_bytes": get("alias_size_in_bytes"),
        "temp_bytes": get("temp_size_in_bytes"),
        "code_bytes": get("generated_code_size_in_bytes"),
        "host_temp_bytes": get("host_temp_size_in_bytes"),
        "peak_bytes": get("peak_memory_in_bytes"),
    }
    # The same total as tessera.aot: what the program holds at once, donated buffers counted once.
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
        + out["code_bytes"]
    )
    return out


# libtpu 0.0.52 prices each ConcatBitcast custom call (the v6e compiler stages buffers through
# on-chip memory with them) at exactly -1 s; tessera.aot.analysis.cost adds the second back per
# call, and so does this driver (it runs in MaxText's venv, without tessera).
_UNCOSTED = re.compile(r'custom_call_target="ConcatBitcast"')


def _cost(program, hlo: str) -> dict[str, float | None]:
    """XLA's cost of ``program``, whose optimized HLO text is ``hlo``."""
    ca = program.cost_analysis()
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    ca = dict(ca or {})

    def get(name):
        v = ca.get(name)
        return None if v is None or not math.isfinite(float(v)) else float(v)

    raw = get("optimal_seconds")
    n = len(_UNCOSTED.findall(hlo))
    return {
        "flops": get("flops"),
        "optimal_seconds": None if raw is None else raw + n,
        "raw_optimal_seconds": raw,
        "uncosted_ops": n,
        "bytes_accessed": get("bytes accessed"),
        "transcendentals": get("transcendentals"),
    }


def run_compile(args: argparse.Namespace) -> dict:
    """Mirror of ``train_compile.main`` (non-DiLoCo path) that keeps the compiled object."""
    os.environ["LIBTPU_INIT_ARGS"] = (
        os.environ.get("LIBTPU_INIT_ARGS", "") + " --xla_tpu_spmd_rng_bit_generator_unsafe=true"
    )
    import jax
    from flax.core.spmd import logical_axis_rules as axis_rules
    from maxtext.configs import pyconfig
    from maxtext.trainers.pre_train import train, train_compile
    from maxtext.utils import max_utils, maxtext_utils, sharding

    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    argv = _maxtext_argv(args)
    config = pyconfig.initialize(argv)
    train_compile.validate_config(config)
    mesh = train_compile.get_topology_mesh(config)
    devices = mesh.devices.flatten()

    t0 = time.perf_counter()
    shaped = train_compile.get_shaped_inputs(mesh, config)
    shaped_args, shaped_kwargs, state_shardings, _, model = shaped
    params_shardings, state_shardings = sharding.maybe_update_params_sharding_with_opt(
        config, state_shardings
    )
    input_state_shardings = sharding.build_zero1_input_state_mesh_shardings(
        config, state_shardings, params_shardings
    )
    data_sharding = sharding.get_input_data_sharding(config, mesh)
    func, in_shard, out_shard, static_argnums, donate_argnums = (
        maxtext_utils.get_functional_train_with_signature(
            train.train_step, data_sharding, input_state_shardings, model, config, params_shardings
        )
    )
    t1 = time.perf_counter()
    # train_compile.jit_and_compile, step by step, to keep the lowered program too.
    mesh_ctx = mesh if config.enable_diloco else contextlib.nullcontext()
    with jax.set_mesh(mesh), mesh_ctx, axis_rules(config.logical_axis_rules):
        jitted = jax.jit(func, in_shardings=in_shard, out_shardings=out_shard,
                         static_argnums=static_argnums, donate_argnums=donate_argnums)
        lowered = jitted.lower(*shaped_args, **shaped_kwargs)
    t_lower = time.perf_counter()
    compiled = lowered.compile(
        compiler_options=max_utils.parse_libtpu_flags_to_dict(config.compile_xla_flags)
    )
    t2 = time.perf_counter()


    try:
        tflops = maxtext_utils.calculate_tflops_training_per_device(config, log=False)
        total_tflops, weight_tflops, attn_tflops = tflops
        maxtext_tflops = {
            "total_per_device": float(total_tflops),
            "weights_per_device": float(weight_tflops),
            "attention_per_device": float(attn_tflops),
        }
    except Exception as e:  # noqa: BLE001 - informational only
        maxtext_tflops = {"error": repr(e)}

    dims = {
        "emb_dim": int(config.emb_dim),
        "num_layers": int(config.num_decoder_layers),
        "heads": int(config.num_query_heads),
        "kv_heads": int(config.num_kv_heads),
        "head_dim": int(config.head_dim),
        "mlp_dim": int(config.mlp_dim),
        "vocab_size": int(config.vocab_size),
    }
    try:  # read once: the cost correction, the kernel and loop counts and --hlo_out use it
        hlo = compiled.as_text() or ""
    except Exception:  # noqa: BLE001 - informational only
        hlo = None
    result = {
        "model": args.model,
        "topology": args.topology,
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "overrides": args.set or [],
        "maxtext_argv": argv[2:],
        "config": {
            **dims,
            "attention": str(config.attention),
            "remat_policy": str(config.remat_policy),
            "scan_layers": bool(config.scan_layers),
            "dtype": str(config.dtype),
            "weight_dtype": str(config.weight_dtype),
            "per_device_batch_size": float(config.per_device_batch_size),
            "global_batch_size": int(config.global_batch_size_to_train_on),
            "max_target_length": int(config.max_target_length),
            "opt_type": str(config.opt_type),
        },
        "memory": _memory(compiled),
        "cost": _cost(compiled, hlo or ""),
        "maxtext_tflops": maxtext_tflops,
        "seconds": {"shapes": t1 - t0, "lower": t_lower - t1, "lower_compile": t2 - t1},
        "versions": _versions(),
    }
    try:  # Pallas kernels (splash attention) lower to tpu_custom_call
        if hlo is None:
            raise ValueError("no HLO text")
        result["tpu_custom_calls"] = hlo.count('custom_call_target="tpu_custom_call"')
        # XLA's cost analysis counts a loop body once: what loops the program has.
        loops = while_loops(hlo)
        result["while_loops"] = len(loops)
        result["while_trip_counts"] = [x["trip_count"] for x in loops]
        result["while_op_names"] = sorted({x["op_name"] for x in loops})
        if args.hlo_out:
            with gzip.open(args.hlo_out, "wt") as f:
                f.write(hlo)
    except Exception:  # noqa: BLE001 - informational only
        result["tpu_custom_calls"] = result["while_loops"] = None
    del compiled
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# row mode (children run compile mode; this process never imports jax)


def _compile_name(args: argparse.Namespace, name: str) -> str:
    if name != "full" and args.cost_xla_flags:  # keep each flag set's compiles apart
        name += "_" + hashlib.sha1(args.cost_xla_flags.encode()).hexdigest()[:6]
    return name


def _child(args: argparse.Namespace, name: str, overrides: list[str], log_dir: str) -> dict:
    name = _compile_name(args, name)
    out = os.path.join(log_dir, f"{name}.json")
    log = os.path.join(log_dir, f"{name}.log")
    cmd = [
        sys.executable, os.path.abspath(__file__), "compile", f"--model={args.model}",
        f"--topology={args.topology}", f"--num_slices={args.num_slices}",
        f"--per_device_batch={args.per_device_batch}", f"--seq={args.seq}",
        f"--workdir={args.workdir}", f"--json={out}",
        f"--hlo_out={os.path.join(log_dir, name + '.hlo.gz')}",
    ] + [f"--set={o}" for o in list(args.set or []) + overrides]
    want = list(args.set or []) + overrides
    if args.reuse and os.path.exists(out):
        with open(out) as f:
            res = json.load(f)
        if res.get("overrides") == want:
            sec = res["seconds"]
            sec.setdefault("wall", sec["shapes"] + sec["lower_compile"])
            print(f"[maxtext] {args.model} {args.topology} {name}: reusing {out}", flush=True)
            return res
    print(f"[maxtext] {args.model} {args.topology} {name}: compiling (log {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc != 0 or not os.path.exists(out):
        raise RuntimeError(f"MaxText compile '{name}' failed (exit {rc}); log: {log}")
    with open(out) as f:
        res = json.load(f)
    res["seconds"]["wall"] = wall
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    mem, cost = res["memory"], res["cost"]
    print(
        f"[maxtext]   done in {wall:.0f}s: HBM {mem['total_bytes'] / 1e9:.2f} GB, "
        f"flops {cost['flops']:.4g}, optimal_seconds {cost['optimal_seconds']}",
        flush=True,
    )
    return res


def _extrapolate(one: dict, two: dict, layers: int, key: str) -> float | None:
    """``one + (layers - 1)(two - one)``; None when either is missing or not positive."""
    a, b = one["cost"][key], two["cost"][key]
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a + (layers - 1) * (b - a)


def run_row(args: argparse.Namespace) -> dict:
    log_dir = args.log_dir or os.path.join(args.workdir, f"{args.model}_{args.topology}")
    os.makedirs(log_dir, exist_ok=True)
    compiles = {"full": _child(args, "full", [], log_dir)}
    # base_num_decoder_layers is set by the model's yml too: MaxText refuses a second value
    # unless override_model_config=true.
    unscanned = ["scan_layers=false", "override_model_config=true"]
    cost_attn = [f"attention={args.cost_attention}"] if args.cost_attention != "default" else []
    if args.cost_xla_flags:
        cost_attn.append(f"compile_xla_flags={args.cost_xla_flags}")
    for n in (1, 2):
        compiles[f"L{n}"] = _child(
            args, f"L{n}", unscanned + [f"base_num_decoder_layers={n}"] + cost_attn, log_dir
        )
    probe = None
    probe_names = [f"L{n}_{a}" for a in ("flash", "dot_product") for n in (1, 2)]
    probed = all(
        os.path.exists(os.path.join(log_dir, f"{_compile_name(args, name)}.json"))
        or f"L{name[1]}" in compiles and args.cost_attention == name[3:]
        for name in probe_names
    )
    if args.probe_attention or (args.reuse and probed):
        probe = {}
        for attn in ("flash", "dot_product"):
            for n in (1, 2):
                name = f"L{n}_{attn}"
                same = args.cost_attention == attn and f"L{n}" in compiles
                extra = [f"compile_xla_flags={args.cost_xla_flags}"] if args.cost_xla_flags else []
                probe[name] = compiles[f"L{n}"] if same else _child(
                    args, name,
                    unscanned + [f"base_num_decoder_layers={n}", f"attention={attn}"] + extra,
                    log_dir,
                )
        layers_full = compiles["full"]["config"]["num_layers"]
        steps = {
            attn: _extrapolate(probe[f"L1_{attn}"], probe[f"L2_{attn}"], layers_full,
                               "optimal_seconds")
            for attn in ("flash", "dot_product")
        }
        if None not in steps.values():
            # Splash skips the masked half of T x T; dot_product computes all of it. Halfway
            # between "attention free" (flash, uncosted) and "all of T x T" (dot_product).
            steps["causal_adjusted"] = (steps["flash"] + steps["dot_product"]) / 2
        probe = {
            "compiles": {
                k: {"cost": v["cost"], "attention": v["config"]["attention"],
                    "tpu_custom_calls": v.get("tpu_custom_calls")}
                for k, v in probe.items()
            },
            "step_seconds": steps,
        }

    full = compiles["full"]
    layers = full["config"]["num_layers"]
    chips = full["chips"]
    seq = full["config"]["max_target_length"]
    tokens = full["config"]["global_batch_size"] * seq
    flops = analytic_flops(
        {k: full["config"][k] for k in ("emb_dim", "num_layers", "heads", "kv_heads", "head_dim",
                                        "mlp_dim", "vocab_size")},
        tokens, seq,
    )
    step = _extrapolate(compiles["L1"], compiles["L2"], layers, "optimal_seconds")
    xla_flops = _extrapolate(compiles["L1"], compiles["L2"], layers, "flops")
    peak = PEAK_BF16.get(chip_family(args.topology))

    def mfu(model_flops):
        if step is None or peak is None or step <= 0:
            return None
        return model_flops / (step * chips * peak)

    return {
        "system": "maxtext",
        "model": args.model,
        "topology": args.topology,
        "chips": chips,
        "device_kind": full["device_kind"],
        "mesh": full["mesh"],
        "config": full["config"],
        "hbm": full["memory"],
        "xla_scanned": full["cost"],
        "cost_config": (
            f"unscanned (scan_layers=false) at base_num_decoder_layers=1 and 2, "
            f"attention={compiles['L1']['config']['attention']}, "
            f"compile_xla_flags='{args.cost_xla_flags}', "
            f"remat_policy={compiles['L1']['config']['remat_policy']}, same batch/seq/mesh"
        ),
        "cost_L1": compiles["L1"]["cost"],
        "cost_L2": compiles["L2"]["cost"],
        "analytic_flops_per_step": flops,
        "maxtext_tflops_per_device": full["maxtext_tflops"],
        "predicted": {
            "method": "extrapolated unrolled cost: T1 + (L-1)(T2-T1)",
            "invalid": None if step is not None else (
                "XLA optimal_seconds not positive: "
                f"L1 {compiles['L1']['cost']['optimal_seconds']}, "
                f"L2 {compiles['L2']['cost']['optimal_seconds']}"
            ),
            "step_seconds": step,
            "xla_flops_per_device": xla_flops,
            "peak_flops_per_chip": peak,
            "mfu": mfu(flops["full"]),
            "mfu_causal": mfu(flops["causal"]),
        },
        "attention_probe": probe,
        "compile_seconds": {k: v["seconds"] for k, v in compiles.items()},
        "compiles": {
            k: {key: v.get(key) for key in ("overrides", "cost", "memory", "tpu_custom_calls",
                                            "while_loops", "while_trip_counts", "seconds")}
            for k, v in compiles.items()
        },
        "versions": full["versions"],
        "log_dir": log_dir,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="compile", choices=("compile", "row"))
    p.add_argument("--model", required=True, help="MaxText model_name, e.g. llama2-7b")
    p.add_argument("--topology", required=True, help="MaxText compile_topology, e.g. v5p-64")
    p.add_argument("--num_slices", type=int, default=1)
    p.add_argument("--per_device_batch", type=float, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--set", action="append", help="MaxText config override key=value (repeatable)")
    p.add_argument("--cost_attention", default="dot_product",
                   help="attention of the L1/L2 cost compiles (row mode); 'default': MaxText's")
    p.add_argument("--cost_xla_flags", default="",
                   help="row mode: libtpu flags for the L1/L2 cost compiles only, e.g. "
                   "--xla_tpu_spmd_unroll_windowed_einsum=true")
    p.add_argument("--probe_attention", action="store_true",
                   help="row mode: also compile L1/L2 with attention=flash and =dot_product")
    p.add_argument("--reuse", action="store_true",
                   help="row mode: keep a compile whose JSON is already in --log_dir")
    p.add_argument("--workdir", default="/tmp/maxtext-compare")
    p.add_argument("--log_dir", default=None, help="row mode: child logs and JSON")
    p.add_argument("--json", required=True, help="write the result here")
    p.add_argument("--hlo_out", default=None, help="compile mode: write the optimized HLO (.gz)")
    args = p.parse_args(argv)
    if args.per_device_batch == int(args.per_device_batch):
        args.per_device_batch = int(args.per_device_batch)
    os.makedirs(args.workdir, exist_ok=True)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other users' libtpu lock
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        result = run_row(args) if args.mode == "row" else run_compile(args)
    except RuntimeError as e:
        print(f"[maxtext] error: {e}", file=sys.stderr, flush=True)
        return 1
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
