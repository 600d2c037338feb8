import json

import ml_collections
import numpy as np
import pytest

from tessera.data import (
    ByteTokenizer,
    check,
    check_ids,
    make_pipeline,
    packing_efficiency,
    split_prompt,
)
from tests.data.batches import assert_batches_equal, take

TOK = ByteTokenizer()
SEQ = 64
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def cfg(**kw):
    return ml_collections.ConfigDict({"source": "synthetic", "seed": 0, **kw})


def pipeline(data_cfg=None, **kw):
    kw = {"tokenizer": TOK, "global_batch_size": 4, "seq_len": SEQ, **kw}
    return make_pipeline(data_cfg if data_cfg is not None else cfg(), **kw)


def documents(batches):
    """Texts of the whole documents (BOS ... EOS) in `batches`, in order."""
    docs = []
    for b in batches:
        for inp, tgt, seg, mask in zip(*(b[k] for k in KEYS[:3]), b["loss_mask"], strict=True):
            row = np.append(inp, tgt[-1])  # the packed row of SEQ + 1 tokens
            row_seg = np.append(seg, seg[-1] if mask[-1] else 0)
            for s in range(1, seg.max() + 1):
                piece = row[row_seg == s]
                if piece[0] == TOK.bos_id and piece[-1] == TOK.eos_id:
                    docs.append(TOK.decode(piece))
    return docs


def text_file(tmp_path, docs, name="docs.txt"):
    path = tmp_path / name
    path.write_text("\n".join(docs) + "\n")
    return cfg(source="text", path=str(path))


def test_batch_layout_and_invariants():
    b = next(pipeline())
    for k in KEYS[:4]:
        assert b[k].shape == (4, SEQ) and b[k].dtype == np.int32, k
    assert b["loss_mask"].shape == (4, SEQ) and b["loss_mask"].dtype == np.float32
    inp, tgt, seg, pos, mask = (b[k] for k in KEYS)
    np.testing.assert_array_equal(tgt[:, :-1], inp[:, 1:])  # targets are the next token
    assert (inp[:, 0] == TOK.bos_id).all()
    same_doc_next = seg[:, 1:] == seg[:, :-1]
    np.testing.assert_array_equal(mask[:, :-1], (same_doc_next & (seg[:, :-1] > 0)).astype(float))
    assert (mask[inp == TOK.eos_id] == 0).all() and (mask[tgt == TOK.bos_id] == 0).all()
    assert (mask[seg == 0] == 0).all() and (mask[tgt == TOK.pad_id] == 0).all()
    starts = np.concatenate([np.ones((4, 1), bool), ~same_doc_next], axis=1)
    assert ((pos == 0) == ((starts & (seg > 0)) | (seg == 0))).all()
    np.testing.assert_array_equal(inp[pos == 0][seg[pos == 0] > 0], TOK.bos_id)
    assert mask.mean() > 0.8  # packing is dense


def test_documents_are_valid_examples():
    docs = documents(take(pipeline(), 3))
    assert len(docs) > 20
    for doc in docs:
        assert check(*split_prompt(doc)), doc


def test_deterministic_for_a_seed():
    assert_batches_equal(take(pipeline(seed=5), 3), take(pipeline(seed=5), 3))
    a, b = take(pipeline(seed=5), 1)[0], take(pipeline(seed=6), 1)[0]
    assert not np.array_equal(a["inputs"], b["inputs"])


@pytest.mark.parametrize("source", ["synthetic", "long_text"])
def test_resume_mid_stream(tmp_path, source):
    data_cfg = cfg()
    if source == "long_text":  # documents longer than a row, so the state points inside one
        rng = np.random.default_rng(0)
        docs = ["".join(rng.choice(list("abcdef"), size=rng.integers(50, 200))) for _ in range(30)]
        data_cfg = text_file(tmp_path, docs)
    it = pipeline(data_cfg, seq_len=32)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    if source == "long_text":
        assert any(stream["offset"] > 0 for stream in state["grain"]["streams"])
    expected = take(it, 4)
    fresh = pipeline(data_cfg, seq_len=32)
    next(fresh)  # a used iterator can be rewound too
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)


def test_set_state_rejects_other_settings():
    state = pipeline().get_state()
    with pytest.raises(ValueError, match=r"global_batch_size=4 \(now 8\)"):
        pipeline(global_batch_size=8).set_state(state)
    with pytest.raises(ValueError, match=r"seed=0 \(now 1\)"):
        pipeline(seed=1).set_state(state)


def concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("streams", [0, 2])
def test_processes_split_the_single_process_batch(tmp_path, streams):
    """Each process's rows are its slice of the global batch, which does not depend on the number
    of processes; the processes' documents are disjoint."""
    all_docs = [f"document number {i}" for i in range(40)]
    data_cfg = text_file(tmp_path, all_docs)
    data_cfg.streams = streams
    whole = take(pipeline(data_cfg, global_batch_size=4), 6)
    parts = [
        take(pipeline(data_cfg, process_index=p, process_count=2, global_batch_size=4), 6)
        for p in range(2)
    ]
    assert parts[0][0]["inputs"].shape == (2, SEQ)
    assert_batches_equal([concat(list(b)) for b in zip(*parts)], whole)
    seen = [set(documents(batches)) for batches in parts]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(all_docs)  # 6 batches cover more than one epoch


def test_streams_setting(tmp_path):
    data_cfg = cfg(streams=2)
    b = next(pipeline(data_cfg, global_batch_size=4))
    # rows 0-1 come from stream 0, 2-3 from stream 1: a stream's second row continues its first
    assert b["inputs"].shape == (4, SEQ)
    with pytest.raises(ValueError, match=r"data.streams=3 must divide global_batch_size 4"):
        pipeline(cfg(streams=3))
    with pytest.raises(ValueError, match=r"multiple of the process count 4"):
        pipeline(cfg(streams=2), global_batch_size=8, process_count=4)
    few = text_file(tmp_path, ["only", "three", "docs"])
    with pytest.raises(ValueError, match="3 documents in 1 files, fewer than the 4 input streams"):
        next(pipeline(few))


def test_old_state_version_is_refused():
    state = pipeline().get_state()
    state["version"] = 1
    with pytest.raises(ValueError, match=r"version=1 \(now 2\)"):
        pipeline().set_state(state)


def test_mixture_proportions_and_eval(tmp_path):
    a = text_file(tmp_path, [f"alpha {i}" for i in range(30)], "a.txt").path
    b = text_file(tmp_path, [f"beta {i}" for i in range(30)], "b.txt").path
    mix = cfg(source="mixture", mixture=f"text:{a}=3; text:{b}=1")
    docs = documents(take(pipeline(mix, global_batch_size=4), 20))
    share = sum(d.startswith("alpha") for d in docs) / len(docs)
    assert len(docs) > 100 and 0.65 < share < 0.85, share
    assert_batches_equal(take(pipeline(mix), 3), take(pipeline(mix), 3))
    ev = documents(list(pipeline(mix, split="eval")))
    expected = [f"alpha {i}" for i in range(30)] + [f"beta {i}" for i in range(30)]
    assert sorted(ev) == sorted(expected)
    for spec, msg in [
        ("", "needs data.mixture"),
        ("text:a.txt", "has no weight"),
        ("text:a.txt=x", "is not a number"),
        ("text:a.txt=0", "must be > 0"),
        ("shapes=1", "cannot be mixed"),
    ]:
        with pytest.raises(ValueError, match=msg):
            next(pipeline(cfg(source="mixture", mixture=spec)))


def test_first_fit_packing_is_denser_and_resumes(tmp_path):
    rng = np.random.default_rng(1)
    docs = ["".join(rng.choice(list("abcdef"), size=rng.integers(2, 60))) for _ in range(200)]
    greedy = text_file(tmp_path, docs)
    first_fit = text_file(tmp_path, docs)
    first_fit.update(packing="first_fit", pack_window=16)
    efficiency = {}
    for name, data_cfg in (("greedy", greedy), ("first_fit", first_fit)):
        batches = take(pipeline(data_cfg), 20)
        efficiency[name] = np.mean([packing_efficiency(b["segment_ids"]) for b in batches])
    assert efficiency["first_fit"] > efficiency["greedy"] + 0.05, efficiency
    it = pipeline(first_fit)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state["packing"] == "first_fit:16"
    expected = take(it, 4)
    fresh = pipeline(first_fit)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)
    with pytest.raises(ValueError, match=r"packing='first_fit:16' \(now 'greedy'\)"):
        pipeline(greedy).set_state(state)
    with pytest.raises(ValueError, match="unknown data.packing 'best'"):
        pipeline(cfg(packing="best"))
    with pytest.raises(ValueError, match="data.pack_window must be >= 1"):
        pipeline(cfg(packing="first_fit", pack_window=0))


def test_train_shuffles_and_repeats(tmp_path):
    all_docs = [f"doc {i}" for i in range(10)]
    one_stream = text_file(tmp_path, all_docs)
    one_stream.streams = 1  # the 4 rows of a batch continue each other
    docs = documents(take(pipeline(one_stream), 4))
    assert len(docs) > 20  # repeats past the 10 documents
    assert docs[:10] != all_docs and sorted(docs[:10]) == sorted(all_docs)
    assert docs[10:20] != docs[:10]  # each epoch reshuffled


def test_eval_is_finite_ordered_and_padded(tmp_path):
    all_docs = [f"eval doc {i} " + "x" * (i % 7) for i in range(45)]
    data_cfg = text_file(tmp_path, all_docs)
    batches = list(pipeline(data_cfg, split="eval"))
    assert all(b["inputs"].shape == (4, SEQ) for b in batches)
    assert sorted(documents(batches)) == sorted(all_docs)
    for row in range(4):  # row r is stream r: its documents in order
        assert documents([{k: v[row : row + 1] for k, v in b.items()} for b in batches]) == (
            all_docs[row::4]
        )
    last = batches[-1]
    assert (last["segment_ids"][-1] == 0).all() and (last["loss_mask"][-1] == 0).all()
    assert (last["inputs"][-1] == TOK.pad_id).all()
    whole = list(pipeline(data_cfg, split="eval", global_batch_size=6))
    for streams in (0, 3):  # streams of a process end at different batches: padding fills in
        data_cfg.streams = streams
        shards = [
            pipeline(data_cfg, split="eval", process_index=p, process_count=3, global_batch_size=6)
            for p in range(3)
        ]
        parts = [[next(s, None) for _ in whole] for s in shards]
        if not streams:
            assert_batches_equal(
                [concat([b or s.padding() for b, s in zip(row, shards)]) for row in zip(*parts)],
                whole,
            )
        assert all(next(s, None) is None for s in shards)
        assert not shards[0].padding()["loss_mask"].any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of process_count 2"):
        pipeline(global_batch_size=3, process_count=2)
    with pytest.raises(ValueError, match="process_index 2 not in"):
        pipeline(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="unknown data source"):
        pipeline(cfg(source="nope"))


def check_vocab(batch, vocab_size):
    for key in ("inputs", "targets"):
        check_ids(batch[key], vocab_size)


def test_check_ids():
    b = next(pipeline())
    check_vocab(b, 259)
    with pytest.raises(ValueError, match=r"^token id \d+ out of range for vocab_size 100$"):
        check_vocab(b, 100)
    b["targets"][0, 3] = 300
    with pytest.raises(ValueError, match=r"^token id 300 out of range for vocab_size 259$"):
        check_vocab(b, 259)
    b["targets"][0, 3] = -1
    with pytest.raises(ValueError, match=r"^token id -1 out of range"):
        check_vocab(b, 259)


def test_a_process_opens_only_its_streams_files(tmp_path):
    for i in range(8):  # files[s::4] belong to stream s; process 1 runs streams 2 and 3
        (tmp_path / f"part-{i}.txt").write_text(f"file {i} doc a\nfile {i} doc b\n")
    (tmp_path / "part-3.txt").write_text("")  # stream 3's file: only process 1 notices
    data_cfg = cfg(source="text", path=str(tmp_path / "part-*.txt"))
    docs = documents(take(pipeline(data_cfg, process_index=0, process_count=2), 4))
    assert {d.split()[1] for d in docs} == {"0", "1", "4", "5"}
    with pytest.raises(ValueError, match="part-3.txt"):
        pipeline(data_cfg, process_index=1, process_count=2)


def _write(tmp_path, fmt, docs):
    path = tmp_path / f"docs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path, row_group_size=16)
    else:
        from tessera.data import write_text_array_record

        write_text_array_record(path, docs)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "array_record", "mixture", "first_fit"])
def test_every_source_resumes_exactly(tmp_path, kind):
    rng = np.random.default_rng(2)
    docs = ["".join(rng.choice(list("abcdefgh "), size=rng.integers(5, 90))) for _ in range(60)]
    fmt = kind if kind in ("jsonl", "parquet", "array_record") else "jsonl"
    data_cfg = cfg(source="text", path=_write(tmp_path, fmt, docs))
    if kind == "mixture":
        data_cfg.update(source="mixture", mixture=f"text:{data_cfg.path}=2;synthetic=1")
    if kind == "first_fit":
        data_cfg.update(packing="first_fit", pack_window=8)
    if kind in ("jsonl", "parquet", "array_record"):
        assert sorted(documents(list(pipeline(data_cfg, split="eval", seq_len=128)))) == sorted(
            d for d in docs if d.strip()
        )
    it = pipeline(data_cfg, seq_len=32)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    fresh = pipeline(data_cfg, seq_len=32)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 5), expected)


@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (1, 2), (4, 2)])
def test_resume_with_another_process_count(saved_by, resumed_by, capsys):
    """Each stream's position comes from the process that ran it: the resumed processes read
    exactly the batches the saving processes would have read next."""
    data_cfg = cfg()
    saving = [pipeline(data_cfg, global_batch_size=8, process_index=p, process_count=saved_by)
              for p in range(saved_by)]
    for it in saving:
        take(it, 3)
    saved = [json.loads(json.dumps(it.get_state())) for it in saving]
    want = [concat([next(it) for it in saving]) for _ in range(2)]
    resumed = [pipeline(data_cfg, global_batch_size=8, process_index=p, process_count=resumed_by)
               for p in range(resumed_by)]
    for it in resumed:
        it.set_state({"saved_by_processes": saved})
    assert_batches_equal([concat([next(it) for it in resumed]) for _ in range(2)], want)
    other = pipeline(data_cfg, global_batch_size=8, seed=1)
    with pytest.raises(ValueError, match=r"seed=0 \(now 1\)"):
        other.set_state({"saved_by_processes": saved})
