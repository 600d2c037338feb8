"""tools/aot_presets.py without libtpu or a compile: a stand-in `.venv/bin/python -m
tessera.aot` writes the JSON the tool promises (or fails), and the table is read back."""

import copy
import json
import os

from tests.tools.test_compare_maxtext import TESSERA_JSON, _load, _script

presets = _load("aot_presets")

REPORT = copy.deepcopy(TESSERA_JSON)
REPORT.update(global_batch=128, example="4096 tokens", remat="full",
              mesh={"data": 1, "fsdp": 32, "tensor": 1})
REPORT["predicted"]["tokens_per_second_per_device"] = 3276.8


def _stand_in(tmp_path, body):
    _script(str(tmp_path / "repo" / ".venv" / "bin" / "python"), body)
    return ["--repo", str(tmp_path / "repo"), "--workdir", str(tmp_path / "work")]


def test_runs_each_pair_and_prints_one_table(tmp_path, capsys):
    """Fits, does not fit (exit 1 with a JSON) and a failed compile, one row each; the flags
    reach tessera.aot."""
    not_fit = copy.deepcopy(REPORT)
    not_fit["hbm"]["fits"] = False
    refused = {"config": "x", "topology": "v6e-64", "devices": 64, "hbm": {  # XLA's OOM refusal
        "fits": False, "capacity_bytes": 34e9, "needed_bytes": 60 * 2**30, "detail": "..."}}
    argv = _stand_in(tmp_path, (
        "import json, sys\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)\n"
        "assert sys.argv[1:3] == ['-m', 'tessera.aot'], sys.argv\n"
        "assert args['--config.train.loss_chunk'] == '512', sys.argv\n"
        "if args['--config'] == 'bad:x':\n"
        "    print('error: boom'); sys.exit(2)\n"
        f"report = {REPORT!r} if args['--topology'] == 'v5p-64' else {not_fit!r}\n"
        f"report = {refused!r} if args['--config'] == 'big:x' else report\n"
        "report.update(config=args['--config'], topology=args['--topology'])\n"
        "json.dump(report, open(args['--json'], 'w'))\n"
        "sys.exit(0 if report['hbm']['fits'] else 1)\n"
    ))
    out = tmp_path / "table.md"
    code = presets.main(argv + ["--presets=llama:8b,bad:x,big:x", "--topologies=v5p-64,v6e-64",
                                "--set=train.loss_chunk=512", f"--out={out}"])
    assert code == 1  # one pair failed
    rows = out.read_text().splitlines()[2:]
    assert rows[0] == ("| llama:8b | v5p-64 | 4 x 4096, remat full, fsdp=32 | 31.7 / 95 | fits | "
                       "5.00 s | 80.0% / 70.0% | 3,277 |")
    assert "| llama:8b | v6e-64 |" in rows[1] and "**does not fit**" in rows[1]
    assert rows[2] == "| bad:x | v5p-64 | exit 2: error: boom | | | | | |"
    assert rows[4] == ("| big:x | v5p-64 | | XLA: 60 GiB of temporaries needed | **does not fit** "
                       "| | | |")
    assert "[llama:8b v5p-64] done" in capsys.readouterr().out


def test_pod_settings_reach_tessera_aot_and_the_row(tmp_path):
    """A preset's POD_SETTINGS for the topology's generation (deepseek:v3's bf16 state on v5p,
    and a capacity factor on v6e) are passed to tessera.aot before any --set, and printed in
    its row."""
    assert presets.pod_settings("deepseek:v3", "v6e-256") == (
        "model.param_dtype=bfloat16", "model.moe.capacity_factor=1.25")
    assert presets.pod_settings("llama:8b", "v5p-256") == ()
    argv = _stand_in(tmp_path, (
        "import json, sys\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)\n"
        "assert args['--config.model.param_dtype'] == 'bfloat16', sys.argv\n"
        f"report = {REPORT!r}\n"
        "report.update(config=args['--config'], topology=args['--topology'])\n"
        "json.dump(report, open(args['--json'], 'w'))\n"
    ))
    out = tmp_path / "table.md"
    assert presets.main(argv + ["--presets=deepseek:v3", "--topologies=v5p-64",
                                f"--out={out}"]) == 0
    row = out.read_text().splitlines()[2]
    assert row.startswith("| deepseek:v3 | v5p-64 | 4 x 4096, remat full, fsdp=32, "
                          "model.param_dtype=bfloat16 | 31.7 / 95 | fits |"), row


def test_reuse_keeps_an_earlier_json(tmp_path):
    argv = _stand_in(tmp_path, "import sys; sys.exit(3)\n")  # would fail if it ran
    os.makedirs(tmp_path / "work")
    with open(tmp_path / "work" / "llama_8b@v5p-64.json", "w") as f:
        json.dump(REPORT, f)
    assert presets.main(argv + ["--presets=llama:8b", "--topologies=v5p-64", "--reuse"]) == 0


def test_missing_venv_is_one_line(tmp_path, capsys):
    assert presets.main(["--repo", str(tmp_path), "--presets=llama:8b"]) == 2
    assert "run `make install` first" in capsys.readouterr().err
