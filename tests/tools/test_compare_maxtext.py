"""tools/compare_maxtext.py and tools/maxtext_driver.py without MaxText, libtpu or a compile.

The real runs need a side venv with maxtext (minutes of install, minutes per compile); here the
subprocesses are stand-in scripts that write the JSON each side promises, or fail.
"""

import importlib.util
import json
import os
import stat
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


compare = _load("compare_maxtext")
driver = _load("maxtext_driver")

TESSERA_JSON = {
    "config": "llama:8b",
    "topology": "v5p-64",
    "chips": 32,
    "devices": 32,
    "hbm": {
        "argument_bytes": 4_000_000_000, "output_bytes": 4_000_000_000, "temp_bytes": 30e9,
        "alias_bytes": 4_000_000_000, "total_bytes": 34e9, "capacity_bytes": 102e9, "fits": True,
    },
    "xla": {"flops": 1e13, "optimal_seconds": 0.5},
    "analytic_flops_per_step": 6.0e16,
    "predicted": {"method": "extrapolated unrolled cost", "step_seconds": 5.0, "mfu": 0.8,
                  "mfu_causal": 0.7, "flops_per_step": 6.1e16},
}


def _script(path, body):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\n{body}")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def _args(tmp_path, **kw):
    ns = compare.argparse.Namespace(
        workdir=str(tmp_path / "work"), repo=str(tmp_path / "repo"), reuse=False, cost_xla_flags="",
        cost_attention="dot_product", probe_attention=False,
    )
    vars(ns).update(kw)
    os.makedirs(ns.workdir, exist_ok=True)
    return ns


def test_analytic_flops_llama2_7b():
    dims = dict(emb_dim=4096, num_layers=32, heads=32, kv_heads=32, head_dim=128, mlp_dim=11008,
                vocab_size=32000)
    tokens, seq = 128 * 4096, 4096
    f = driver.analytic_flops(dims, tokens, seq)
    # 32 x (4 x 4096^2 + 3 x 4096 x 11008) + 4096 x 32000 matmul weights (embedding lookup free)
    assert f["matmul_weights"] == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    assert f["matmul"] == 6 * tokens * f["matmul_weights"]
    assert f["attention_full"] == 12 * tokens * seq * 32 * 128 * 32
    assert f["causal"] == f["matmul"] + f["attention_full"] / 2
    assert f["full"] > f["causal"]


def test_chip_family_and_peaks():
    assert driver.chip_family("v5p-64") == "v5p"
    assert driver.chip_family("v6e-64") == "v6e"
    assert driver.chip_family("v5litepod-16") == "v5e"
    assert driver.PEAK_BF16 == {"v5p": 459e12, "v6e": 918e12, "v5e": 197e12, "v4": 275e12}


def test_parse_rows():
    assert compare.parse_rows(None) == [
        ("llama2-7b", "v5p-64"), ("llama2-7b", "v6e-64"),
        ("llama3.1-8b", "v5p-64"), ("llama3.1-8b", "v6e-64"),
    ]
    assert compare.parse_rows("llama3.1-8b@v6e-64") == [("llama3.1-8b", "v6e-64")]
    with pytest.raises(compare.CompareError, match="MODEL@TOPOLOGY"):
        compare.parse_rows("gpt2@v5p-64")


def test_tessera_side_reads_the_aot_json(tmp_path):
    """A stand-in `.venv/bin/python -m tessera.aot` gets the documented flags and its JSON is
    read; exit 1 (does not fit) still counts as a report."""
    _script(
        str(tmp_path / "repo" / ".venv" / "bin" / "python"),
        "import json, sys\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)\n"
        "assert sys.argv[1:3] == ['-m', 'tessera.aot'], sys.argv\n"
        "assert args['--config'] == 'llama:8b' and args['--topology'] == 'v5p-64'\n"
        "assert args['--per_device_batch'] == '4' and args['--config.data.seq_len'] == '4096'\n"
        f"json.dump({TESSERA_JSON!r}, open(args['--json'], 'w'))\n"
        "sys.exit(1)\n",
    )
    res = compare.run_tessera("llama3.1-8b", "v5p-64", _args(tmp_path))
    s = compare.summarize("tessera", res)
    assert s["hbm_gb"] == pytest.approx(34.0) and s["step_s"] == 5.0
    assert (s["mfu"], s["mfu_causal"], s["fits"]) == (0.8, 0.7, True)


def test_tessera_failure_is_one_line_with_log(tmp_path):
    _script(str(tmp_path / "repo" / ".venv" / "bin" / "python"), "import sys; sys.exit(2)\n")
    with pytest.raises(compare.CompareError, match=r"tessera.aot failed .* \(exit 2\); log: "):
        compare.run_tessera("llama2-7b", "v6e-64", _args(tmp_path))


def test_maxtext_failure_is_one_line_with_log(tmp_path):
    venv = tmp_path / "venv"
    _script(str(venv / "bin" / "python"),
            "import sys; print('boom', file=sys.stderr); sys.exit(3)\n")
    with pytest.raises(compare.CompareError) as e:
        compare.run_maxtext(str(venv), "llama2-7b", "v5p-64", _args(tmp_path))
    msg = str(e.value)
    assert "MaxText failed for llama2-7b on v5p-64 (exit 3); log: " in msg and "\n" not in msg
    logf = msg.split("log: ")[1].split(" ")[0]
    assert "boom" in open(logf).read()


def test_venv_that_cannot_be_created(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(compare, "_find_python312", lambda: None)
    rc = compare.main(["--venv", str(blocker / "venv"), "--workdir", str(tmp_path / "w"),
                       "--skip_tessera"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: cannot create the MaxText venv") and "\n" not in err


def test_table_and_ratios(tmp_path):
    mt = {
        "hbm": {"total_bytes": 40e9},
        "predicted": {"step_seconds": 4.0, "mfu": 0.5, "mfu_causal": 0.45},
        "analytic_flops_per_step": {"full": 1.0, "causal": 0.9},
    }
    rows = [{
        "model": "llama3.1-8b", "topology": "v5p-64",
        "maxtext": compare.summarize("maxtext", mt),
        "tessera": compare.summarize("tessera", TESSERA_JSON),
    }]
    text = compare.table(rows)
    header, sep, line = text.splitlines()
    assert header.count("|") == sep.count("|") == line.count("|")
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:6] == ["llama3.1-8b", "v5p-64", "34.00", "40.00", "5.000", "4.000"]
    assert cells[6] == "80.0% / 70.0%" and cells[7] == "50.0% / 45.0%"
    assert cells[8:] == ["1.25", "0.85"]
    rows[0]["tessera"] = {}
    assert compare.table(rows).splitlines()[2].count("-") >= 3  # missing side prints '-'


def _child_json(layers, flops, seconds, attention, overrides, hbm=1e9):
    return {
        "chips": 32, "device_kind": "TPU v5", "mesh": {"fsdp": 32, "data": 1},
        "overrides": overrides,
        "config": dict(emb_dim=4096, num_layers=layers, heads=32, kv_heads=32, head_dim=128,
                       mlp_dim=11008, vocab_size=32000, attention=attention,
                       remat_policy="full", global_batch_size=128, max_target_length=4096),
        "memory": {"argument_bytes": hbm, "output_bytes": hbm, "alias_bytes": hbm,
                   "temp_bytes": hbm, "code_bytes": 0, "total_bytes": 2 * hbm},
        "cost": {"flops": flops, "optimal_seconds": seconds},
        "maxtext_tflops": {}, "seconds": {"shapes": 1.0, "lower_compile": 2.0, "wall": 5.0},
        "versions": {"maxtext": "0.2.5"},
    }


def test_driver_row_extrapolates_from_finished_compiles(tmp_path):
    """Row mode with --reuse rebuilds a row from the compiles' JSON: T1 + (L-1)(T2-T1), MFU
    with the analytic FLOPs both ways, and the flash/dot_product probe."""
    log_dir = tmp_path / "row"
    log_dir.mkdir()
    unscanned = ["scan_layers=false", "override_model_config=true"]
    files = {
        "full": _child_json(32, 2e13, 0.07, "autoselected", []),
        "L1": _child_json(1, 2.5e13, 0.09, "dot_product",
                          unscanned + ["base_num_decoder_layers=1", "attention=dot_product"]),
        "L2": _child_json(2, 4.0e13, 0.15, "dot_product",
                          unscanned + ["base_num_decoder_layers=2", "attention=dot_product"]),
        "L1_flash": _child_json(1, 2.0e13, 0.07, "flash",
                                unscanned + ["base_num_decoder_layers=1", "attention=flash"]),
        "L2_flash": _child_json(2, 3.0e13, 0.12, "flash",
                                unscanned + ["base_num_decoder_layers=2", "attention=flash"]),
    }
    for name, res in files.items():
        (log_dir / f"{name}.json").write_text(json.dumps(res))
    out = tmp_path / "row.json"
    rc = driver.main(["row", "--model=llama2-7b", "--topology=v5p-64", "--reuse",
                      f"--log_dir={log_dir}", f"--workdir={tmp_path}", f"--json={out}"])
    assert rc == 0
    row = json.loads(out.read_text())
    step = 0.09 + 31 * 0.06
    assert row["predicted"]["step_seconds"] == pytest.approx(step)
    assert row["predicted"]["xla_flops_per_device"] == pytest.approx(2.5e13 + 31 * 1.5e13)
    fl = row["analytic_flops_per_step"]
    assert row["predicted"]["mfu"] == pytest.approx(fl["full"] / (step * 32 * 459e12))
    assert row["predicted"]["mfu_causal"] == pytest.approx(fl["causal"] / (step * 32 * 459e12))
    assert row["hbm"]["total_bytes"] == 2e9
    steps = row["attention_probe"]["step_seconds"]
    assert steps["flash"] == pytest.approx(0.07 + 31 * 0.05)
    assert steps["dot_product"] == pytest.approx(step)
    assert steps["causal_adjusted"] == pytest.approx((steps["flash"] + step) / 2)
    assert "attention=dot_product" in row["cost_config"]
    assert compare.probe_detail(row).count(" s (MFU") == 3
    assert "= 2.00 GB" in compare.maxtext_detail(row)


HLO = """HloModule jit_train_step

%cond.1 (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(32)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  ROOT %p = (s32[], f32[8]) parameter(0)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %w = (s32[], f32[8]) while(%t), condition=%cond.1, body=%body.1, """ \
    """metadata={op_name="jit(train_step)/jvp()/while"}
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_while_loops_reads_trip_counts():
    assert driver.while_loops(HLO) == [
        {"trip_count": 32, "op_name": "jit(train_step)/jvp()/while"}
    ]
    assert driver.while_loops("HloModule m\n\nENTRY %main () -> f32[] {\n}\n") == []


def test_loop_warning_names_the_flags():
    res = {"model": "llama2-7b", "topology": "v5p-64",
           "compiles": {"L1": {"while_loops": 16}, "L2": {"while_loops": 31}}}
    msg = compare.loop_warning(res)
    assert "{'L1': 16, 'L2': 31}" in msg and compare.NO_WINDOWED_EINSUM in msg
    res["compiles"] = {"L1": {"while_loops": 0}, "L2": {"while_loops": 0}}
    assert compare.loop_warning(res) is None


def test_maxtext_cost_flags_are_tessera_aots():
    """Both systems' cost programs compile with the same flags (windowed einsums off)."""
    from tessera.aot.compile import COST_COMPILER_OPTIONS

    flags = dict(f[2:].split("=") for f in compare.NO_WINDOWED_EINSUM.split())
    assert flags == {k: str(v).lower() for k, v in COST_COMPILER_OPTIONS.items()}


def test_driver_cost_adds_back_a_second_per_concat_bitcast():
    """libtpu 0.0.52 prices each ConcatBitcast custom call at -1 s; the driver (which runs
    without tessera) corrects MaxText's figures the way tessera.aot.analysis.cost does."""

    class Program:
        def cost_analysis(self):
            return [{"flops": 1e12, "optimal_seconds": -2.75, "bytes accessed": 5e9}]

    call = 'custom-call(%a, %b), custom_call_target="ConcatBitcast"\n'
    hlo = "ENTRY main {\n" + call * 3 + "ROOT %r = f32[] add()\n}"
    cost = driver._cost(Program(), hlo)
    assert cost["raw_optimal_seconds"] == -2.75 and cost["uncosted_ops"] == 3
    assert cost["optimal_seconds"] == pytest.approx(0.25)
    assert cost["flops"] == 1e12 and cost["bytes_accessed"] == 5e9
