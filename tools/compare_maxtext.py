"""tessera's TPU ahead-of-time compile beside MaxText's ``train_compile``, on a machine with no TPU.

For each row (model x topology, per-device batch 4, sequence 4096) this runs

  MaxText  ``tools/maxtext_driver.py row`` in a side virtualenv (MaxText needs Python 3.12 and
           its own jax/libtpu pins, so it never shares tessera's venv): the default program
           (scanned layers, MaxText's remat and attention for the model, FSDP over all chips) for
           HBM per device, and unscanned 1- and 2-layer programs for the predicted step time
  tessera  ``<repo>/.venv/bin/python -m tessera.aot --config=llama:<preset> --topology=<topo>
           --per_device_batch=4 --config.data.seq_len=4096 --json=OUT``

and prints one markdown table: HBM per device, predicted step time and MFU of each, and the
ratios tessera/MaxText.

Predicted step time, the same method for both ("extrapolated unrolled cost"): XLA's
``cost_analysis()`` counts a loop body once, so a scanned program's ``optimal_seconds`` is not a
step time. Compile the train step unscanned at 1 and 2 layers (same batch, sequence, mesh,
shardings, remat) and take T(L) = T1 + (L-1)(T2-T1). MaxText's cost compiles use
``attention=dot_product`` by default (``--cost_attention``): XLA gives the splash-attention
Pallas call (a ``tpu_custom_call``) no FLOPs, so costing the flash program would leave the
attention matmuls out of the step time. MFU = analytic model FLOPs per step / (predicted seconds
x chips x peak bf16 FLOP/s per chip), printed with attention counted over the full T x T and
over the causal half (MaxText's own convention).

What the cost analysis gets wrong (libtpu 0.0.52, jax 0.12.0.1, MaxText 0.2.5): on v5p XLA turns
the FSDP matmuls into windowed-einsum while loops (trip count 16) even in the unscanned programs,
so their flops and time are counted 1/16: llama2-7b's 1-layer program reports 2.59e13 flops per
device, 4.25e13 with the windowed einsums off, which matches the analytic count and v6e. So the
cost compiles of both systems turn them off (``NO_WINDOWED_EINSUM``, the flags tessera.aot uses;
the script warns if a cost compile still holds loops). On v6e libtpu prices each
``ConcatBitcast`` custom call at -1 s, which made ``optimal_seconds`` negative; both systems add
the second back per call (``tessera.aot.analysis.cost``; the driver counts them itself).

Usage::

  python tools/compare_maxtext.py                       # all four rows, both systems
  python tools/compare_maxtext.py --rows=llama2-7b@v5p-64 --skip_tessera --out=results.json

The side venv is made when missing (``--venv``, default /tmp/maxtext-venv): Python 3.12
(``~/.pyenv/versions/3.12.1`` or ``python3.12``), ``pip install "maxtext[tpu]"`` (the bare
``maxtext`` wheel declares no dependencies) then ``pip install -U libtpu``. Compiles run one at a
time (each is a few GB and minutes of CPU on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tools", "maxtext_driver.py")

# MaxText model_name -> tessera --config.
MODELS = {"llama2-7b": "llama:llama2-7b", "llama3.1-8b": "llama:8b"}
TOPOLOGIES = ("v5p-64", "v6e-64")
DEFAULT_ROWS = [f"{m}@{t}" for m in MODELS for t in TOPOLOGIES]
PER_DEVICE_BATCH = 4
SEQ = 4096
GB = 1e9


class CompareError(RuntimeError):
    """One line for the user; the script exits non-zero with it."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# the side virtualenv


def _find_python312() -> str | None:
    for cand in (
        os.path.expanduser("~/.pyenv/versions/3.12.1/bin/python3"),
        shutil.which("python3.12"),
    ):
        if cand and os.path.exists(cand):
            return cand
    return None


def _run_logged(cmd: list[str], logf: str, what: str, env: dict | None = None) -> None:
    log(f"[venv] {what}: {' '.join(cmd)}  (log {logf})")
    with open(logf, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise CompareError(f"{what} failed (exit {rc}); log: {logf}")


def _venv_check(py: str) -> dict | None:
    """Versions when maxtext, jax and libtpu import and jax's TPU plugin loads; None otherwise."""
    code = (
        "import json, os\n"
        "os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')\n"
        "os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')\n"
        "from importlib import metadata\n"
        "import maxtext, libtpu, jax\n"
        "from jax.experimental.topologies import get_topology_desc\n"
        "get_topology_desc(platform='tpu', topology_name='v5p:2x2x1')\n"
        "print(json.dumps({p: metadata.version(p) for p in "
        "('maxtext', 'jax', 'jaxlib', 'libtpu', 'flax')}))\n"
    )
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def ensure_venv(venv: str, maxtext_spec: str, workdir: str) -> dict:
    py = os.path.join(venv, "bin", "python")
    logf = os.path.join(workdir, "venv-setup.log")
    if os.path.exists(py):
        versions = _venv_check(py)
        if versions:
            log(f"[venv] reusing {venv}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
            return versions
        log(f"[venv] {venv} exists but maxtext/libtpu do not load there; installing")
    else:
        base = _find_python312()
        if base is None:
            raise CompareError(
                "cannot create the MaxText venv: no Python 3.12 (~/.pyenv/versions/3.12.1 or "
                "python3.12 on PATH)"
            )
        env = dict(os.environ, PYENV_VERSION="3.12.1")
        _run_logged([base, "-m", "venv", venv], logf, f"creating {venv}", env=env)
        if not os.path.exists(py):
            raise CompareError(f"cannot create the MaxText venv at {venv}; log: {logf}")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    _run_logged(pip + ["-U", "pip"], logf, "upgrading pip")
    # The bare maxtext wheel declares no dependencies; the [tpu] extra brings jax, flax, libtpu...
    _run_logged(pip + [maxtext_spec], logf, f"installing {maxtext_spec}")
    _run_logged(pip + ["-U", "libtpu"], logf, "upgrading libtpu")
    versions = _venv_check(py)
    if not versions:
        raise CompareError(
            f"maxtext or libtpu does not load in {venv} after installing; log: {logf}"
        )
    log("[venv] ready: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return versions


# ---------------------------------------------------------------------------------------------
# one row per system


def run_maxtext(venv: str, model: str, topo: str, args: argparse.Namespace) -> dict:
    py = os.path.join(venv, "bin", "python")
    row_dir = os.path.join(args.workdir, "maxtext", f"{model}_{topo}")
    os.makedirs(row_dir, exist_ok=True)
    out = os.path.join(row_dir, "row.json")
    logf = os.path.join(row_dir, "driver.log")
    cmd = [
        py, DRIVER, "row", f"--model={model}", f"--topology={topo}",
        f"--per_device_batch={PER_DEVICE_BATCH}", f"--seq={SEQ}",
        f"--cost_attention={args.cost_attention}", f"--workdir={args.workdir}",
        f"--log_dir={row_dir}", f"--json={out}",
    ]
    if args.cost_xla_flags:
        cmd.append(f"--cost_xla_flags={args.cost_xla_flags}")
    if args.probe_attention:
        cmd.append("--probe_attention")
    if args.reuse:
        cmd.append("--reuse")
    log(f"[maxtext] {model} {topo}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    with open(logf, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
        for line in proc.stdout:  # the driver's progress lines
            log("  " + line.rstrip())
        rc = proc.wait()
    if rc != 0 or not os.path.exists(out):
        raise CompareError(
            f"MaxText failed for {model} on {topo} (exit {rc}); log: {logf} "
            f"(per-compile logs in {row_dir})"
        )
    log(f"[maxtext] {model} {topo}: {time.perf_counter() - t0:.0f}s")
    with open(out) as f:
        return json.load(f)


def run_tessera(model: str, topo: str, args: argparse.Namespace) -> dict:
    py = os.path.join(args.repo, ".venv", "bin", "python")
    if not os.path.exists(py):
        raise CompareError(f"tessera's venv is missing: {py}")
    row_dir = os.path.join(args.workdir, "tessera")
    os.makedirs(row_dir, exist_ok=True)
    out = os.path.join(row_dir, f"{model}_{topo}.json")
    logf = os.path.join(row_dir, f"{model}_{topo}.log")
    if args.reuse and os.path.exists(out):
        log(f"[tessera] {model} {topo}: reusing {out}")
        with open(out) as f:
            return json.load(f)
    cmd = [
        py, "-m", "tessera.aot", f"--config={MODELS[model]}", f"--topology={topo}",
        f"--per_device_batch={PER_DEVICE_BATCH}", f"--config.data.seq_len={SEQ}", f"--json={out}",
    ]
    log(f"[tessera] {model} {topo}: {' '.join(cmd)}  (log {logf})")
    if os.path.exists(out):
        os.remove(out)
    t0 = time.perf_counter()
    with open(logf, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=args.repo)
    # tessera.aot: exit 0 fits, 1 does not fit in HBM (the report is still written), 2 bad input.
    if rc not in (0, 1) or not os.path.exists(out):
        raise CompareError(f"tessera.aot failed for {model} on {topo} (exit {rc}); log: {logf}")
    log(f"[tessera] {model} {topo}: {time.perf_counter() - t0:.0f}s")
    with open(out) as f:
        res = json.load(f)
    res.setdefault("compile_seconds_wall", time.perf_counter() - t0)
    return res


# ---------------------------------------------------------------------------------------------
# the table


def _get(d: dict | None, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def summarize(system: str, res: dict | None) -> dict:
    """The few figures the table shows, from either system's JSON."""
    if not res:
        return {}
    if system == "maxtext":
        hbm = res["hbm"]
        return {
            "hbm_gb": hbm["total_bytes"] / GB,
            "step_s": _get(res, "predicted", "step_seconds"),
            "mfu": _get(res, "predicted", "mfu"),
            "mfu_causal": _get(res, "predicted", "mfu_causal"),
            "analytic_flops": _get(res, "analytic_flops_per_step", "full"),
        }
    return {
        "hbm_gb": (_get(res, "hbm", "total_bytes") or 0) / GB or None,
        "step_s": _get(res, "predicted", "step_seconds"),
        "mfu": _get(res, "predicted", "mfu"),
        "mfu_causal": _get(res, "predicted", "mfu_causal"),
        "analytic_flops": res.get("analytic_flops_per_step"),
        "fits": _get(res, "hbm", "fits"),
    }


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | topology | HBM/dev GB tessera | HBM/dev GB MaxText | step s tessera "
        "| step s MaxText | MFU tessera (full / causal) | MFU MaxText (full / causal) "
        "| step ratio t/M | HBM ratio t/M |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t, m = r["tessera"], r["maxtext"]
        lines.append(
            f"| {r['model']} | {r['topology']} | {_f(t.get('hbm_gb'), '.2f')} "
            f"| {_f(m.get('hbm_gb'), '.2f')} | {_f(t.get('step_s'), '.3f')} "
            f"| {_f(m.get('step_s'), '.3f')} "
            f"| {_f(t.get('mfu'), '.1%')} / {_f(t.get('mfu_causal'), '.1%')} "
            f"| {_f(m.get('mfu'), '.1%')} / {_f(m.get('mfu_causal'), '.1%')} "
            f"| {_ratio(t.get('step_s'), m.get('step_s'))} "
            f"| {_ratio(t.get('hbm_gb'), m.get('hbm_gb'))} |"
        )
    return "\n".join(lines)


def probe_detail(res: dict) -> str | None:
    probe = res.get("attention_probe")
    if not probe or "step_seconds" not in probe:
        return None
    comp, steps = probe["compiles"], probe["step_seconds"]
    peak = res["predicted"]["peak_flops_per_chip"]
    fl = res["analytic_flops_per_step"]

    def mfu(t):
        if t is None or not peak:
            return "-"
        denom = t * res["chips"] * peak
        return f"{fl['full'] / denom:.1%}/{fl['causal'] / denom:.1%}"

    parts = [
        f"{name} {_f(t, '.3f')} s (MFU full/causal {mfu(t)})" for name, t in steps.items()
    ]
    return (
        f"  MaxText {res['model']} {res['topology']} attention probe: 1-layer XLA flops/dev "
        f"flash {comp['L1_flash']['cost']['flops']:.4g} "
        f"({comp['L1_flash'].get('tpu_custom_calls')} tpu_custom_call) vs dot_product "
        f"{comp['L1_dot_product']['cost']['flops']:.4g}; predicted step " + "; ".join(parts)
    )


# The flags of tessera.aot's cost programs (tessera/aot/compile.py: COST_COMPILER_OPTIONS, checked
# by tests/tools): both systems' 1/2-layer cost programs compile without windowed einsums.
NO_WINDOWED_EINSUM = (
    "--xla_tpu_enable_windowed_einsum_for_all_gather=false "
    "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false "
    "--xla_tpu_decompose_all_gather_einsum=false "
    "--xla_tpu_decompose_einsum_reduce_scatter=false"
)


def loop_warning(res: dict) -> str | None:
    """XLA on v5p turns FSDP matmuls into windowed-einsum while loops even in the unscanned cost
    programs; their bodies are costed once, so flops and optimal_seconds come out low."""
    comp = res.get("compiles") or {}
    loops = {k: comp[k].get("while_loops") for k in ("L1", "L2") if k in comp}
    if not any(loops.values()):
        return None
    return (
        f"  warning: MaxText {res['model']} {res['topology']} cost compiles hold while loops "
        f"{loops} (windowed einsum; XLA costs a loop body once, so the prediction is low); "
        f"--cost_xla_flags='{NO_WINDOWED_EINSUM}' compiles them without"
    )


def maxtext_detail(res: dict) -> str:
    h, c = res["hbm"], res["predicted"]
    s = res["compile_seconds"]
    return (
        f"  MaxText {res['model']} {res['topology']} ({res['chips']} chips, mesh "
        f"{ {k: v for k, v in res['mesh'].items() if v > 1} }, attention "
        f"{res['config']['attention']}, remat {res['config']['remat_policy']}): HBM/dev "
        f"arg {h['argument_bytes'] / GB:.2f} + out {h['output_bytes'] / GB:.2f} - alias "
        f"{h['alias_bytes'] / GB:.2f} + temp {h['temp_bytes'] / GB:.2f} + code "
        f"{h['code_bytes'] / GB:.3f} = {h['total_bytes'] / GB:.2f} GB; optimal_seconds scanned "
        f"{_f(res['xla_scanned']['optimal_seconds'], '.4f')}, L1 "
        f"{_f(res['cost_L1']['optimal_seconds'], '.4f')}, L2 "
        f"{_f(res['cost_L2']['optimal_seconds'], '.4f')} -> {_f(c['step_seconds'], '.3f')} s"
        f"{' (' + c['invalid'] + ')' if c.get('invalid') else ''}; "
        f"XLA flops/dev {_f(c['xla_flops_per_device'], '.4g')} vs analytic/dev "
        f"{res['analytic_flops_per_step']['full'] / res['chips']:.4g} (full) "
        f"{res['analytic_flops_per_step']['causal'] / res['chips']:.4g} (causal); compile s "
        + ", ".join(f"{k} {v['wall']:.0f}" for k, v in s.items())
    )


def parse_rows(spec: str | None) -> list[tuple[str, str]]:
    items = DEFAULT_ROWS if not spec else [x.strip() for x in spec.split(",") if x.strip()]
    out = []
    for item in items:
        model, _, topo = item.partition("@")
        if model not in MODELS or not topo:
            raise CompareError(
                f"bad row {item!r}: rows look like MODEL@TOPOLOGY with MODEL in {sorted(MODELS)}"
            )
        out.append((model, topo))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default="/tmp/maxtext-venv", help="MaxText's side virtualenv")
    p.add_argument("--maxtext", default="maxtext[tpu]",
                   help="pip spec installed into a new venv (e.g. 'maxtext[tpu]==0.2.5')")
    p.add_argument("--rows", default=None,
                   help="comma-separated MODEL@TOPOLOGY (default: " + ",".join(DEFAULT_ROWS) + ")")
    p.add_argument("--skip_tessera", action="store_true")
    p.add_argument("--skip_maxtext", action="store_true")
    p.add_argument("--cost_attention", default="dot_product",
                   help="MaxText attention for the 1/2-layer cost compiles ('default' keeps flash)")
    p.add_argument("--cost_xla_flags", default=NO_WINDOWED_EINSUM,
                   help="libtpu flags for MaxText's 1/2-layer cost compiles only (default: "
                   "tessera.aot's, windowed einsums off)")
    p.add_argument("--probe_attention", action="store_true",
                   help="also cost MaxText's 1/2-layer programs with flash and with dot_product")
    p.add_argument("--reuse", action="store_true",
                   help="reuse compiles whose results are already in --workdir")
    p.add_argument("--workdir", default="/tmp/compare-maxtext", help="logs and per-row JSON")
    p.add_argument("--repo", default=REPO, help="tessera checkout whose .venv runs tessera.aot")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)

    try:
        rows = parse_rows(args.rows)
        versions = None
        if not args.skip_maxtext:
            versions = ensure_venv(args.venv, args.maxtext, args.workdir)
        results = []
        for model, topo in rows:
            entry = {"model": model, "topology": topo, "tessera_config": MODELS[model]}
            entry["maxtext_result"] = None if args.skip_maxtext else run_maxtext(
                args.venv, model, topo, args
            )
            entry["tessera_result"] = None if args.skip_tessera else run_tessera(model, topo, args)
            entry["maxtext"] = summarize("maxtext", entry["maxtext_result"])
            entry["tessera"] = summarize("tessera", entry["tessera_result"])
            results.append(entry)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1

    print()
    print(f"per-device batch {PER_DEVICE_BATCH}, sequence {SEQ}; HBM/dev = argument + output - "
          "alias + temp + code bytes per device (1 GB = 1e9 B)")
    print("predicted step time: extrapolated unrolled cost, T1 + (L-1)(T2-T1) from XLA's "
          "optimal_seconds of unscanned 1- and 2-layer train steps")
    if not args.skip_maxtext and results:
        r0 = results[0]["maxtext_result"]
        print(f"MaxText cost configuration: {r0['cost_config']}")
        print(f"MaxText versions: {versions}")
    print("MFU = analytic model FLOPs / (step s x chips x peak bf16); 'full' counts attention "
          "over all of T x T, 'causal' over half (MaxText's convention)")
    print()
    print(table(results))
    print()
    for r in results:
        if r["maxtext_result"]:
            print(maxtext_detail(r["maxtext_result"]))
            for extra in (probe_detail(r["maxtext_result"]), loop_warning(r["maxtext_result"])):
                if extra:
                    print(extra)
        t = r["tessera_result"]
        if t:
            fl = r["tessera"].get("analytic_flops")
            print(f"  tessera {r['model']} {r['topology']}: analytic FLOPs/step "
                  f"{_f(fl, '.4g')}, fits {r['tessera'].get('fits')}, method "
                  f"{_get(t, 'predicted', 'method')}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": results, "maxtext_versions": versions,
                       "per_device_batch": PER_DEVICE_BATCH, "seq": SEQ}, f, indent=1)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
