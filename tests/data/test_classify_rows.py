"""Rule-labelled rows for the classify task."""

import itertools
import json

import ml_collections
import numpy as np
import pytest

from tessera.data import ByteTokenizer, SyntheticSource, make_rule_pipeline, strip_rule

TOK = ByteTokenizer()


def pipeline(**kw):
    data_cfg = ml_collections.ConfigDict({"source": "synthetic", "seed": 0, "synthetic_tasks": ""})
    kw = {"tokenizer": TOK, "global_batch_size": 8, "seq_len": 16, **kw}
    return make_rule_pipeline(data_cfg, **kw)


@pytest.mark.parametrize("example, rule, body", [
    ("417+38=455", "add", "417+38=455"),
    ("copy:hello=hello", "copy", "hello=hello"),
    ("rev:hello=olleh", "rev", "hello=olleh"),
    ("sort:dcab=abcd", "sort", "dcab=abcd"),
])
def test_strip_rule(example, rule, body):
    assert strip_rule(example) == (rule, body)


def test_rows_hold_the_example_without_its_rule_and_the_label():
    b = next(pipeline(seq_len=12))
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "inputs": ((8, 12), np.int32), "segment_ids": ((8, 12), np.int32),
        "positions": ((8, 12), np.int32), "label": ((8,), np.int32)}
    rules = ("add", "copy", "rev", "sort")
    for inputs, seg, pos, label in zip(b["inputs"], b["segment_ids"], b["positions"], b["label"]):
        n = int(seg.sum())
        assert (seg[:n] == 1).all() and (seg[n:] == 0).all() and (inputs[n:] == TOK.pad_id).all()
        np.testing.assert_array_equal(pos[:n], np.arange(n))
        assert inputs[0] == TOK.bos_id and ":" not in TOK.decode(inputs)
        if n < 12:  # not cut: ends in EOS
            assert inputs[n - 1] == TOK.eos_id
        assert 0 <= label < len(rules)
    # The eval split is read in order: labels and inputs follow its examples.
    source = SyntheticSource(seed=0, split="eval")
    first = next(pipeline(split="eval", seq_len=24))
    for i, (inputs, label) in enumerate(zip(first["inputs"], first["label"])):
        rule, body = strip_rule(source[i])
        assert (rules[label], TOK.decode(inputs)) == (rule, body)


def test_eval_pads_with_label_minus_one_and_resumes():
    batches = list(pipeline(split="eval", global_batch_size=48))
    last = batches[-1]
    pad = last["label"] < 0
    assert pad.any() and (last["segment_ids"][pad] == 0).all()
    assert sum(int((b["label"] >= 0).sum()) for b in batches) == len(SyntheticSource(split="eval"))
    it = pipeline()
    list(itertools.islice(it, 3))
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    fresh = pipeline()
    fresh.set_state(state)
    for k, v in next(fresh).items():
        np.testing.assert_array_equal(v, expected[k])


def test_only_the_embedded_corpus():
    data_cfg = ml_collections.ConfigDict({"source": "text", "path": "x.txt"})
    with pytest.raises(ValueError, match="data.source must be 'synthetic', got 'text'"):
        make_rule_pipeline(data_cfg, tokenizer=TOK, global_batch_size=2, seq_len=8)


def test_positions_of_another_process_count_restart_the_input(capsys):
    """Rule rows are sharded per process, not per stream: a checkpoint of 2 processes cannot be
    regrouped, so one process starts its input afresh and says so."""
    saved = []
    for p in range(2):
        it = pipeline(process_index=p, process_count=2)
        next(it)
        saved.append(it.get_state())
    resumed = pipeline()
    resumed.set_state({"saved_by_processes": saved})
    np.testing.assert_array_equal(next(resumed)["inputs"], next(pipeline())["inputs"])
    assert "holds the data positions of 2 processes and this run has 1" in capsys.readouterr().err
