"""bench data: the pipeline's table per host against the step's need (no timing is asserted)."""

import itertools

import grain
import jax
import numpy as np
import pytest

from tessera.bench.__main__ import main
from tessera.bench.data import BatchCounts, count_batch, run_data_bench, time_pipelines, verdict
from tessera.data.packing import FirstFitPackIterDataset, PackIterDataset, packing_efficiency
from tessera.data.pipeline import _features

PAD, BOS, EOS = 0, 1, 2
SEQ = 8  # rows of SEQ + 1 tokens
TINY = {"data.global_batch_size": "4"}  # llama:tiny, seq_len 128


def documents(lengths, bos=True):
    """Token documents `[bos] + text + [eos]` with `lengths` text tokens (ids from 3)."""
    return [np.array([BOS] * bos + [3 + i % 50 for i in range(n)] + [EOS], np.int32)
            for n in lengths]


def batch_of(docs, packer):
    """Every row `packer` makes of `docs`, as one batch in the pipeline's layout."""
    rows = list(packer(grain.MapDataset.source(docs).to_iter_dataset(), row_len=SEQ + 1,
                       pad_id=PAD))
    feats = [_features(r) for r in rows]
    return {k: np.stack([f[k] for f in feats]) for k in feats[0]}


PACKERS = {
    "greedy": PackIterDataset,
    "first_fit": lambda parent, **kw: FirstFitPackIterDataset(parent, window=4, **kw),
}


@pytest.mark.parametrize("packing", PACKERS)
@pytest.mark.parametrize("bos", [True, False])
def test_count_batch_counts_every_document_once(packing, bos):
    # 6 text tokens + BOS + EOS fill 8 slots, so the next (long) document's BOS lands on the
    # row's last token, which only `targets` holds; lengths 0 make one- or two-token documents.
    lengths = [6, 20, 0, 3, 9, 0, 1, 13, 2, 5]
    batch = batch_of(documents(lengths, bos), PACKERS[packing])
    counts = count_batch(batch, marker=BOS if bos else EOS, pad_id=PAD)
    rows = batch["segment_ids"].shape[0]
    assert counts == BatchCounts(rows=rows, slots=rows * SEQ,
                                 tokens=int(np.count_nonzero(batch["segment_ids"])),
                                 documents=len(lengths))
    assert counts.tokens / counts.slots == packing_efficiency(batch["segment_ids"])


def test_count_batch_sees_a_document_start_on_the_last_token():
    batch = batch_of(documents([6, 20]), PACKERS["greedy"])
    assert batch["targets"][0, -1] == BOS and batch["loss_mask"][0, -1] == 0
    assert count_batch(batch, marker=BOS, pad_id=PAD).documents == 2
    assert count_batch({k: v[:1] for k, v in batch.items()}, marker=BOS, pad_id=PAD) \
        .documents == 2  # the second starts at the first row's last token


def test_count_batch_rejects_a_single_row():
    batch = batch_of(documents([3]), PACKERS["greedy"])
    with pytest.raises(ValueError, match="segment_ids must be"):
        count_batch({k: v[0] for k, v in batch.items()}, marker=BOS, pad_id=PAD)


def test_time_pipelines_alternates_and_sums_the_counts():
    calls = []

    def source(name):
        for i in itertools.count():
            calls.append(name)
            yield {"n": i}

    timings = time_pipelines({"a": source("a"), "b": source("b")}, batches=2, rounds=3,
                             count=lambda b: BatchCounts(1, 4, 3, 1))
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # first batches, then rounds alternate
    for t in timings.values():
        assert t.batches == 7 and t.counts == BatchCounts(7, 28, 21, 7)  # the first included
        assert 0 < t.first_s < t.total_s and t.batch_s == t.total_s / 7
        assert t.per_s(t.counts.rows) == pytest.approx(1 / t.batch_s)
    with pytest.raises(ValueError, match="batches and rounds must be >= 1"):
        time_pipelines({"a": source("a")}, batches=0, rounds=1, count=lambda b: None)


def test_verdict_lines():
    assert verdict(2.04, 0.1, 0.2) == "input keeps up (2.0x the step's need)"
    line = verdict(0.5, 0.2, 0.1)
    assert line.startswith("input would starve the step: it makes 0.50x the slots/s")
    assert "a batch takes 200 ms, a step 100 ms" in line
    assert "a step" not in verdict(0.5, 0.2, None)


def table(out):
    """The printed table as {column: [cells]} and the lines after it."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("input pipeline per host"))
    header, rule = lines[start + 1], lines[start + 2]
    spans, col = [], 0
    for dashes in rule.split("  "):
        spans.append((col, col + len(dashes)))
        col += len(dashes) + 2
    names = [header[a:b].strip() for a, b in spans]
    in_table = lambda line: ": input " not in line and not line.startswith("note: ")
    body = list(itertools.takewhile(in_table, lines[start + 3:]))
    rows = [[line[a:b].strip() for a, b in spans] for line in body]
    return {n: [r[i] for r in rows] for i, n in enumerate(names)}, lines[start + 3 + len(rows):]


def number(cell):
    return float(cell.replace(",", ""))


def check_row(row, batch_rows, seq_len=128):
    assert row["rows/batch"] == batch_rows
    assert 0 < row["efficiency"] <= 1
    assert 0 < row["docs/s"] < row["tokens/s"] <= row["slots/s"]
    assert row["tokens/s"] == pytest.approx(row["efficiency"] * row["slots/s"])
    assert row["slots/s"] == pytest.approx(row["rows/s"] * seq_len)
    assert row["rows/s"] == pytest.approx(batch_rows / row["batch (ms)"] * 1e3)


def test_data_bench_cli_without_a_step(capsys):
    main(["data", "--config=llama:tiny", "--no_step", "--batches=2", "--rounds=2",
          "--config.data.global_batch_size=4"])
    cols, after = table(capsys.readouterr().out)
    assert list(cols) == ["config", "packing", "processes", "rows/batch", "setup (s)",
                          "1st batch (s)",
                          "batch (ms)", "docs/s", "rows/s", "tokens/s", "slots/s", "efficiency"]
    assert cols["config"] == ["llama:tiny"] and cols["packing"] == ["greedy"]
    assert cols["processes"] == ["1"] and cols["rows/batch"] == ["4"]
    assert 0 < number(cols["efficiency"][0]) <= 1
    assert number(cols["tokens/s"][0]) <= number(cols["slots/s"][0])
    assert after == []  # no step, no verdict


def test_data_bench_as_one_process_of_two_against_a_given_step(capsys):
    [row] = run_data_bench("llama:tiny", TINY, batches=2, rounds=1, processes=2,
                           step_tokens_per_s=1e12)
    check_row(row, batch_rows=2)
    assert row["processes"] == 2 and row["step slots/s/host"] == 5e11
    assert row["headroom"] == row["slots/s"] / row["step slots/s/host"]
    out = capsys.readouterr().out
    cols, _ = table(out)
    headroom = number(cols["slots/s"][0]) / number(cols["step slots/s/host"][0])
    assert number(cols["headroom"][0]) == pytest.approx(headroom, rel=2e-3)
    assert "llama:tiny greedy: input would starve the step: it makes " in out
    assert "step tokens/s given" in out


def test_data_bench_compares_packings_in_one_table(capsys):
    rows = run_data_bench("llama:tiny", TINY, batches=2, rounds=2,
                          packings=["greedy", "first_fit:16"], measure_step=False)
    assert [r["packing"] for r in rows] == ["greedy", "first_fit:16"]
    for row in rows:
        check_row(row, batch_rows=4)
        assert "headroom" not in row
    cols, after = table(capsys.readouterr().out)
    assert cols["packing"] == ["greedy", "first_fit:16"]
    # 5 batches of 1 row from each of 4 streams, 16 documents a window: under 4 windows a stream
    docs = rows[1]["docs/s"] / rows[1]["rows/s"] * 5 * 4
    [note] = after
    assert note.startswith(f"note: first_fit:16: each stream read about {docs / 4 / 16:.1f} ")
    assert note.endswith("raise --batches")


@pytest.mark.slow
def test_data_bench_measures_the_step(capsys):
    [row] = run_data_bench("llama:tiny", TINY, batches=2, rounds=1, steps=1,
                           devices=jax.devices()[:1])
    check_row(row, batch_rows=4)
    assert row["step slots/s/host"] > 0
    assert row["headroom"] == pytest.approx(row["slots/s"] / row["step slots/s/host"])
    out = capsys.readouterr().out
    assert "step measured here (1 steps after compile)" in out
    assert f"llama:tiny greedy: input {'keeps up' if row['headroom'] >= 1 else 'would'}" in out


@pytest.mark.parametrize("argv, message", [
    (["--processes=3"], "global_batch_size 4 must be a positive multiple of process_count 3"),
    (["--packings=greedy,greedy"], "packings repeat greedy: greedy,greedy"),
    (["--packings=first_fit:32,first_fit"], "packings repeat first_fit:32"),
    (["--packings=first_fit:0"], "data.pack_window must be >= 1, got 0"),
    (["--packings=bogus"], "unknown data.packing 'bogus'"),
    (["--processes=0"], "processes must be >= 1"),
    (["--step_tokens_per_s=-1"], "step_tokens_per_s must be > 0"),
])
def test_data_bench_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["data", "--config=llama:tiny", "--config.data.global_batch_size=4", "--batches=1",
              *argv])
    assert message in capsys.readouterr().err


def test_data_bench_cli_rejects_a_step_given_and_no_step(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--config=llama:tiny", "--no_step", "--step_tokens_per_s=1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_data_bench_refuses_a_task_without_tokens(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--config=vit:tiny", "--no_step", "--batches=1"])
    assert "bench data measures token pipelines; vit:tiny trains task classify, which counts " \
        "images" in capsys.readouterr().err
