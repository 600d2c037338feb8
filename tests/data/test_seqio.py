"""data.source="seqio": a seqio Task over local text with a SentencePiece vocabulary trained in
the test flows through tessera's streams, packing and batching; resume, processes, errors."""

import json
import uuid

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

pytest.importorskip("seqio")

from tessera.data import make_pipeline  # noqa: E402
from tessera.data.seqio_source import (  # noqa: E402
    SeqioDocuments,
    import_registry,
    import_tensorflow,
    seqio_tokenizer,
)
from tessera.data.tokenizers import get_tokenizer  # noqa: E402
from tests.data.batches import assert_batches_equal, take  # noqa: E402
from tests.data.seqio_registry import VOCAB_SIZE, write_registry  # noqa: E402

SEQ = 32


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return write_registry(tmp_path_factory.mktemp("seqio"), f"tessera_test_{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def sp(reg):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=reg.model)


def cfg(reg, **kw):
    return ml_collections.ConfigDict({
        "source": "seqio", "task": reg.task, "registry_module": reg.path, "tokenizer": "seqio",
        "train_split": "train", "eval_split": "validation", "feature_lengths": "", "seed": 0,
        "streams": 0, "packing": "greedy", **kw,
    })


def pipeline(reg, data_cfg=None, **kw):
    data_cfg = data_cfg if data_cfg is not None else cfg(reg)
    kw = {"tokenizer": seqio_tokenizer(data_cfg), "global_batch_size": 4, "seq_len": SEQ,
          "vocab_size": VOCAB_SIZE, **kw}
    return make_pipeline(data_cfg, **kw)


def valid_lines(reg):
    return [line for line in open(reg.valid).read().splitlines() if line]


def test_documents_are_inputs_then_targets_with_the_tasks_eos(reg, sp):
    docs = iter(SeqioDocuments(cfg(reg), split="eval", vocab_size=VOCAB_SIZE))
    for line in valid_lines(reg)[:3]:  # eval: in order, unshuffled
        ids = sp.encode(line)
        np.testing.assert_array_equal(next(docs), [*ids, 1, *ids, 1])  # eos 1 from append_eos
    lm = iter(SeqioDocuments(cfg(reg, task=reg.task + "_lm"), split="eval"))
    first = next(lm)
    assert first.dtype == np.int32
    np.testing.assert_array_equal(first, [*sp.encode(valid_lines(reg)[0]), 1])


def test_tokenizer_is_the_tasks_targets_vocabulary(reg, sp):
    tok = get_tokenizer("seqio", data_cfg=cfg(reg))
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, None, VOCAB_SIZE)
    line = valid_lines(reg)[0]
    assert tok.encode(line) == sp.encode(line)
    assert tok.decode([*tok.encode(line), tok.eos_id, 5, 6]) == line  # stops at EOS
    with pytest.raises(ValueError, match="needs the data config"):
        get_tokenizer("seqio")


def test_batches_pack_the_tasks_documents(reg):
    b = next(pipeline(reg))
    assert b["inputs"].shape == (4, SEQ) and b["inputs"].dtype == np.int32
    assert b["inputs"].max() < VOCAB_SIZE and (b["segment_ids"] > 0).mean() > 0.5
    # packed rows: inputs shifted by one are the targets
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    # a different seed draws different examples
    other = next(pipeline(reg, seed=1))
    assert not np.array_equal(b["inputs"], other["inputs"])


def test_resume_through_json_gives_the_same_batches(reg):
    it = pipeline(reg)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 3)
    fresh = pipeline(reg)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)
    assert state["grain"]["streams"][0]["parent"]["examples"] > 0


def _segments(batches):
    """The documents (token tuples) of eval batches: each segment of each row."""
    docs = []
    for b in batches:
        for row, tgt, seg in zip(b["inputs"], b["targets"], b["segment_ids"]):
            full = np.append(row, tgt[-1])
            segs = np.append(seg, seg[-1])
            docs += [tuple(full[segs == s]) for s in range(1, seg.max() + 1)]
    return docs


def test_two_processes_make_the_single_process_batch_and_are_disjoint(reg):
    data_cfg = cfg(reg, streams=2)
    whole = take(pipeline(reg, data_cfg), 2)
    parts = [take(pipeline(reg, data_cfg, process_index=p, process_count=2), 2) for p in (0, 1)]
    for w, p0, p1 in zip(whole, *parts):
        for k in w:
            np.testing.assert_array_equal(w[k], np.concatenate([p0[k], p1[k]]), err_msg=k)
    # eval: the processes' documents are disjoint and together the whole split (a row fits a doc)
    seqs = [_segments(pipeline(reg, data_cfg, split="eval", process_index=p, process_count=2,
                               seq_len=128)) for p in (0, 1)]
    assert seqs[0] and seqs[1] and not set(seqs[0]) & set(seqs[1])
    assert len(seqs[0]) + len(seqs[1]) == len(valid_lines(reg))


def test_mixture_and_feature_lengths(reg):
    b = next(pipeline(reg, cfg(reg, task=reg.task + "_mix")))
    assert b["inputs"].shape == (4, SEQ)
    data_cfg = cfg(reg, feature_lengths="inputs=3,targets=2")
    doc = next(iter(SeqioDocuments(data_cfg, split="eval")))
    assert len(doc) == 5  # seqio truncated each feature
    with pytest.raises(ValueError, match="FEATURE=LENGTH with FEATURE one of inputs, targets"):
        SeqioDocuments(cfg(reg, feature_lengths="labels=3"), split="eval")


@pytest.mark.parametrize("change, error, message", [
    ({"task": "no_such_task"}, ValueError,
     r"data.task='no_such_task' is not a registered seqio Task or Mixture .*registered: "),
    ({"task": ""}, ValueError, "needs data.task"),
    ({"registry_module": "/nonexistent/reg.py"}, FileNotFoundError,
     "data.registry_module '/nonexistent/reg.py': no such file"),
    ({"registry_module": "no_such_pkg.tasks"}, ValueError,
     "data.registry_module 'no_such_pkg.tasks': no module named 'no_such_pkg'"),
    ({"eval_split": "test"}, ValueError, r"has no split 'test' \(has train, validation\); set "
     "data.eval_split"),
    ({"tokenizer": "byte"}, ValueError, "set data.tokenizer=seqio"),
])
def test_bad_input_is_one_line(reg, change, error, message):
    data_cfg = cfg(reg, **change)
    with pytest.raises(error, match=message) as e:
        make_pipeline(data_cfg, tokenizer=get_tokenizer("byte"), global_batch_size=2,
                      seq_len=SEQ, split="eval")
    assert "\n" not in str(e.value)


def test_vocabulary_bigger_than_the_model_is_an_error(reg):
    with pytest.raises(ValueError, match=rf"vocabulary has {VOCAB_SIZE} ids, more than "
                                         r"model.vocab_size=100"):
        pipeline(reg, vocab_size=100)


def test_registry_is_imported_once_and_tf_leaves_jax_working(reg):
    assert import_registry(reg.path) is import_registry(reg.path)
    tf = import_tensorflow()
    assert tf.config.get_visible_devices("GPU") == []
    assert float(jax.jit(lambda x: jnp.sum(x * 2))(jnp.ones(3))) == 6.0


RESUME_SCRIPT = """
import json, sys
import ml_collections
import numpy as np
from tessera.data import make_pipeline
from tessera.data.seqio_source import seqio_tokenizer
data_cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
it = make_pipeline(data_cfg, tokenizer=seqio_tokenizer(data_cfg), global_batch_size=4,
                   seq_len=32, vocab_size=256)
for _ in range(2):
    next(it)
state = it.get_state()
after = [next(it)["inputs"].tolist() for _ in range(2)]
print(json.dumps({"state": state, "after": after}))
"""


def test_resume_in_a_new_process_gives_the_same_batches(reg):
    """The state saved by one process restores in another (the seeded tf.data order does not
    depend on the process)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data_cfg = cfg(reg)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(data_cfg.to_dict())],
                          capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads(proc.stdout.strip().splitlines()[-1])
    it = pipeline(reg, data_cfg)
    it.set_state(saved["state"])
    assert [next(it)["inputs"].tolist() for _ in range(2)] == saved["after"]


def test_registry_module_by_dotted_name(reg, tmp_path, monkeypatch, sp):
    name = f"tessera_dotted_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import seqio\n"
        f"VOCAB = seqio.SentencePieceVocabulary({reg.model!r})\n"
        f"seqio.TaskRegistry.add({name!r}, source=seqio.TextLineDataSource("
        f"{{'validation': {reg.valid!r}}}),\n"
        "    preprocessors=[lambda ds: ds.map(lambda l: {'targets': l}),\n"
        "                   seqio.preprocessors.tokenize],\n"
        "    output_features={'targets': seqio.Feature(VOCAB, add_eos=False)})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    docs = iter(SeqioDocuments(cfg(reg, task=name, registry_module=name), split="eval"))
    np.testing.assert_array_equal(next(docs), sp.encode(valid_lines(reg)[0]))  # no EOS added
