import itertools
import json

import ml_collections
import numpy as np
import pytest

from tessera.data import ByteTokenizer, check, check_ids, make_pipeline, split_prompt

TOK = ByteTokenizer()
SEQ = 64
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def cfg(**kw):
    return ml_collections.ConfigDict({"source": "synthetic", "seed": 0, **kw})


def pipeline(data_cfg=None, **kw):
    kw = {"tokenizer": TOK, "global_batch_size": 4, "seq_len": SEQ, **kw}
    return make_pipeline(data_cfg if data_cfg is not None else cfg(), **kw)


def take(it, n):
    return list(itertools.islice(it, n))


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


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
        assert state["grain"]["offset"] > 0
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


def test_process_shards_are_disjoint(tmp_path):
    all_docs = [f"document number {i}" for i in range(40)]
    data_cfg = text_file(tmp_path, all_docs)
    seen = []
    for p in range(2):
        it = pipeline(data_cfg, process_index=p, process_count=2, global_batch_size=4)
        batches = take(it, 6)
        assert batches[0]["inputs"].shape == (2, SEQ)
        seen.append(set(documents(batches)))
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(all_docs)  # 6 batches cover more than one epoch of a shard


def test_train_shuffles_and_repeats(tmp_path):
    all_docs = [f"doc {i}" for i in range(10)]
    docs = documents(take(pipeline(text_file(tmp_path, all_docs)), 4))
    assert len(docs) > 20  # repeats past the 10 documents
    assert docs[:10] != all_docs and sorted(docs[:10]) == sorted(all_docs)
    assert docs[10:20] != docs[:10]  # each epoch reshuffled


def test_eval_is_finite_ordered_and_padded(tmp_path):
    all_docs = [f"eval doc {i} " + "x" * (i % 7) for i in range(45)]
    data_cfg = text_file(tmp_path, all_docs)
    batches = list(pipeline(data_cfg, split="eval"))
    assert all(b["inputs"].shape == (4, SEQ) for b in batches)
    assert documents(batches) == all_docs
    last = batches[-1]
    assert (last["segment_ids"][-1] == 0).all() and (last["loss_mask"][-1] == 0).all()
    assert (last["inputs"][-1] == TOK.pad_id).all()
    shards = [
        documents(
            pipeline(data_cfg, split="eval", process_index=p, process_count=3, global_batch_size=6)
        )
        for p in range(3)
    ]
    assert shards == [all_docs[p::3] for p in range(3)]


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
