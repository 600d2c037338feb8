"""``python -m tessera.train`` on 2 processes launched as the README says: SIGTERM to one of
them makes both save the same step and exit 143; re-running resumes and the loss curve equals an
uninterrupted run's."""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import pytest

from tessera.configs import load_config
from tessera.serve.loading import load_decoder
from tests.multiprocess import launch

pytestmark = pytest.mark.slow

STEPS = 20


def _train(workdir) -> list[str]:
    return [sys.executable, "-m", "tessera.train", "--config=llama:tiny", f"--workdir={workdir}",
            f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            "--config.checkpoint.every=1000", "--config.train.tensorboard=False"]


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigterm_to_one_process_saves_both_and_resumes_the_same_curve(tmp_path):
    reference = tmp_path / "reference"
    launch.run(_train(reference))

    workdir = tmp_path / "stopped"
    p = launch.popen(_train(workdir))
    lines, pids, signalled = [], {}, False
    for line in p.stdout:
        lines.append(line)
        if m := re.match(r"tessera\.launch: process (\d) of 2: pid (\d+)", line):
            pids[int(m[1])] = int(m[2])
        if not signalled and line.startswith("[p0] step 3:"):
            os.kill(pids[1], signal.SIGTERM)  # one host gets the maintenance event
            signalled = True
    p.wait(timeout=300)
    out = "".join(lines)
    assert signalled and p.returncode == 128 + signal.SIGTERM, out[-4000:]
    saved = re.findall(r"\[p0\] tessera: SIGTERM received by a process of this run; all 2 "
                       r"processes saved checkpoint at step (\d+)", out)
    assert len(saved) == 1, out[-4000:]
    stop = int(saved[0])
    assert 3 <= stop < STEPS
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [stop]
    positions = sorted((workdir / "checkpoints" / str(stop) / "data_by_process").glob("*.json"))
    positions = [p.name for p in positions]
    assert positions == ["process_0-of-2.json", "process_1-of-2.json"]

    out = launch.run(_train(workdir))
    assert f"resuming from step {stop}" in out
    assert f"finished {STEPS} steps" in out
    want, got = _losses(reference), _losses(workdir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step

    # Decode from it on both processes: the batch's rows are sharded over both; process 0 alone
    # writes --output, and its rows equal a one-process decode's.
    prompts = ["12+3=", "rev:abc=", "sort:cab="]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                   for p in prompts))
    output = tmp_path / "out.jsonl"
    launch.run([sys.executable, "-m", "tessera.serve.decode", "--config=llama:tiny",
                f"--workdir={workdir}", f"--prompts_file={tmp_path / 'prompts.jsonl'}",
                f"--output={output}", "--max_new_tokens=6"])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    decoder, _ = load_decoder(load_config("llama:tiny"), str(workdir))
    want = decoder.generate(prompts, max_new_tokens=6)
    assert [r["prompt"] for r in rows] == prompts
    assert [r["tokens"] for r in rows] == [list(map(int, c.tokens)) for c in want]
