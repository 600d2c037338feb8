"""``--output`` loses nothing: rows are written as each batch returns, a killed decode keeps every
complete row, and ``--resume`` decodes only the rest, giving the rows of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tessera.serve import SamplingParams
from tessera.serve.decode import (
    decode_many,
    open_output,
    output_settings,
    read_prompts,
    row_lines,
)
from tessera.train.checkpoints import Checkpointer

from .conftest import TINY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [f"{i}+{2 * i}=" for i in range(7)]
SAMPLING = SamplingParams(temperature=0.8, top_p=0.9, seed=5)


def settings(prompts=PROMPTS, sampling=SAMPLING, step=3):
    return output_settings(prompts, sampling, 4, [], "/runs/x", step)


class Interrupted(Exception):
    pass


def run(decoder, path, *, resume, stop_after=None):
    """decode_many into ``path`` as the CLI does; raise Interrupted after ``stop_after`` batches."""
    f, done = open_output(str(path), PROMPTS, settings(), resume=resume)
    batches = 0

    def write(batch):
        nonlocal batches
        if batches == stop_after:
            raise Interrupted
        f.write(row_lines(batch).encode())
        f.flush()
        batches += 1

    with f:
        decode_many(
            decoder, PROMPTS, SAMPLING, 4, batch_size=2, progress=False, start=done,
            on_batch=write,
        )
    return done


def test_interrupted_then_resumed_equals_uninterrupted(tiny_decoder, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert run(tiny_decoder, whole, resume=False) == 0
    expected = whole.read_text()
    assert [json.loads(r)["prompt"] for r in expected.splitlines()] == PROMPTS

    out = tmp_path / "out.jsonl"
    with pytest.raises(Interrupted):
        run(tiny_decoder, out, resume=False, stop_after=2)
    kept = out.read_text()
    assert kept == "".join(expected.splitlines(keepends=True)[:4])  # two batches of two
    rows = expected.splitlines(keepends=True)
    out.write_text("".join(rows[:3]) + rows[3][:10])  # the kill cut row 3 short
    # The cut row is dropped and redone; the batches are now [3, 4], [5, 6], not [4, 5], [6].
    assert run(tiny_decoder, out, resume=True) == 3
    assert out.read_text() == expected
    assert run(tiny_decoder, out, resume=True) == len(PROMPTS)  # nothing left to do
    assert out.read_text() == expected


def test_output_is_never_overwritten_and_resume_checks(tmp_path):
    out = tmp_path / "out.jsonl"
    f, done = open_output(str(out), PROMPTS, settings(), resume=False)
    f.write(b'{"prompt": "0+0=", "completion": "0"}\n')
    f.close()
    assert done == 0 and os.path.isfile(f"{out}.settings.json")
    with pytest.raises(ValueError, match="out.jsonl already exists: pass --resume"):
        open_output(str(out), PROMPTS, settings(), resume=False)
    with pytest.raises(ValueError, match=r"other settings: prompts \(was 7, now 2\), the prompts$"):
        open_output(str(out), PROMPTS[:2], settings(PROMPTS[:2]), resume=True)
    other = SamplingParams(temperature=0.8, top_p=0.9, seed=6)
    with pytest.raises(ValueError, match=r"other settings: sampling \(was .*'seed': 5.*'seed': 6"):
        open_output(str(out), PROMPTS, settings(sampling=other), resume=True)
    with pytest.raises(ValueError, match=r"other settings: step \(was 3, now 4\)"):
        open_output(str(out), PROMPTS, settings(step=4), resume=True)
    reordered = PROMPTS[1:] + PROMPTS[:1]
    os.replace(f"{out}.settings.json", tmp_path / "s.json")
    with pytest.raises(ValueError, match="out.jsonl.settings.json is missing"):
        open_output(str(out), reordered, settings(reordered), resume=True)
    os.replace(tmp_path / "s.json", f"{out}.settings.json")
    out.write_text('{"prompt": "1+2=", "completion": "3"}\n')
    with pytest.raises(ValueError, match=r"line 1 is not the row of prompt 0 '0\+0='"):
        open_output(str(out), PROMPTS, settings(), resume=True)


def test_cli_killed_then_resumed(tiny, tmp_path):
    """A real decode, killed once rows appear: complete rows stay, --resume finishes the rest."""
    _, _, params = tiny
    workdir = tmp_path / "run"
    ckpt = Checkpointer(str(workdir), async_save=False)
    ckpt.save(0, {"params": params})
    ckpt.close()
    prompts = [f"{i}+{i}=" for i in range(40)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    args = [
        sys.executable, "-m", "tessera.serve.decode", f"--config={TINY}", f"--workdir={workdir}",
        f"--prompts_file={tmp_path / 'p.jsonl'}", f"--output={out}", "--batch_size=2",
        "--max_new_tokens=4", "--temperature=0.7", "--seed=2",
    ]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(args, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    kept = out.read_bytes()
    kept = kept[: kept.rfind(b"\n") + 1]
    assert 0 < len(kept.splitlines()) < len(prompts)

    again = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"tessera: error: output {out} already exists: pass --resume to continue it, or remove it"
    ]
    resumed = subprocess.run(
        [*args, "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out}: {len(kept.splitlines())} of 40 rows already there" in resumed.stderr
    text = out.read_bytes()
    assert text.startswith(kept)
    assert [json.loads(r)["prompt"] for r in text.decode().splitlines()] == prompts


def test_shipped_example_prompts_parse():
    """The README's Decode example reads examples/prompts.jsonl (JSON rows and a plain line)."""
    prompts = read_prompts(os.path.join(REPO, "examples", "prompts.jsonl"))
    assert prompts[0] == "417+38=" and prompts[-1] == "sort:jtcrq=" and len(prompts) == 7
