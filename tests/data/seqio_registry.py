"""Test helper: a local text corpus, a SentencePiece model trained on it, and a registry module
(a .py file) that registers seqio tasks over it with that vocabulary and a metric function."""

from __future__ import annotations

import dataclasses
import random
import textwrap
from pathlib import Path

VOCAB_SIZE = 256  # the SentencePiece model's; pad 0, eos 1, unk 2, bos 3

REGISTRY = '''
import seqio

VOCAB = seqio.SentencePieceVocabulary({model!r})
FILES = {{"train": {train!r}, "validation": {valid!r}}}


def _copy(ds):
    return ds.map(lambda line: {{"inputs": line, "targets": line}})


def _twice(ds):
    return ds.map(lambda line: {{"inputs": line, "targets": line + " " + line}})


def _lm(ds):
    return ds.map(lambda line: {{"targets": line}})


def exact_match(targets, predictions):
    hits = sum(t == p for t, p in zip(targets, predictions))
    return {{"exact_match": 100.0 * hits / max(len(targets), 1)}}


def mean_score(targets, scores):
    return {{"mean_score": float(sum(scores)) / max(len(scores), 1)}}


seqio.TaskRegistry.add(
    {name!r},
    source=seqio.TextLineDataSource(FILES),
    preprocessors=[_copy, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    output_features={{
        "inputs": seqio.Feature(VOCAB, add_eos=True),
        "targets": seqio.Feature(VOCAB, add_eos=True),
    }},
    metric_fns=[exact_match, mean_score],
)
seqio.TaskRegistry.add(
    {name!r} + "_lm",
    source=seqio.TextLineDataSource(FILES),
    preprocessors=[_lm, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    output_features={{"targets": seqio.Feature(VOCAB, add_eos=True)}},
)
seqio.TaskRegistry.add(
    {name!r} + "_twice",
    source=seqio.TextLineDataSource(FILES),
    preprocessors=[_twice, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    output_features={{
        "inputs": seqio.Feature(VOCAB, add_eos=True),
        "targets": seqio.Feature(VOCAB, add_eos=True),
    }},
)
seqio.MixtureRegistry.add({name!r} + "_mix", [({name!r}, 1.0), ({name!r} + "_twice", 1.0)])
'''


@dataclasses.dataclass(frozen=True)
class Registry:
    path: str  # the registry module
    # registered: task (inputs + targets), task_lm (targets), task_twice, task_mix (task + twice)
    task: str
    model: str  # the SentencePiece model
    train: str
    valid: str


def lines(seed: int, n: int) -> list[str]:
    r = random.Random(seed)
    words = ["".join(r.choice("aeioubcdfghklmnprstvw") for _ in range(r.randint(2, 6)))
             for _ in range(400)]
    return [" ".join(r.choice(words) for _ in range(r.randint(2, 8))) for _ in range(n)]


def write_registry(root: Path, name: str) -> Registry:
    """Corpus files, a SentencePiece model trained on them, and the registry module, in `root`;
    tasks named `name`, `name_lm` and mixture `name_mix`."""
    import sentencepiece as spm

    root.mkdir(parents=True, exist_ok=True)
    train, valid = root / "train.txt", root / "valid.txt"
    corpus = lines(0, 600)
    train.write_text("\n".join(corpus[:560]) + "\n")
    valid.write_text("\n".join(corpus[560:]) + "\n")
    prefix = root / "sp"
    spm.SentencePieceTrainer.train(
        input=str(train), model_prefix=str(prefix), vocab_size=VOCAB_SIZE, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=3, minloglevel=2, num_threads=1,
    )
    model = f"{prefix}.model"
    path = root / f"{name}_registry.py"
    path.write_text(textwrap.dedent(REGISTRY.format(
        model=model, train=str(train), valid=str(valid), name=name
    )))
    return Registry(str(path), name, model, str(train), str(valid))
