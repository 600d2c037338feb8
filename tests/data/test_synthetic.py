import math

import pytest

from tessera.data import (
    SyntheticSource,
    check,
    is_eval_prompt,
    parse_tasks,
    split_prompt,
    unigram_entropy,
)
from tessera.data.synthetic import TASKS


@pytest.mark.parametrize(
    "prompt, right, wrong",
    [
        ("417+38=", "455", ["454", "45", "4555", ""]),
        ("0+0=", "0", ["00", "1"]),
        ("copy:hello=", "hello", ["hell", "olleh"]),
        ("rev:hello=", "olleh", ["hello", "olle"]),
        ("sort:dcab=", "abcd", ["dcab", "abdc"]),
    ],
)
def test_check_known_answers(prompt, right, wrong):
    assert check(prompt, right)
    assert check(prompt, right + "\nrev:abc=cba")
    for w in wrong:
        assert not check(prompt, w)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generated_examples_check(task):
    source = SyntheticSource(seed=3, tasks=task)
    for i in range(200):
        prompt, answer = split_prompt(source[i])
        assert prompt.endswith("=") and answer
        assert check(prompt, answer), source[i]
        assert not check(prompt, answer + "z")
        assert not check(prompt, answer[:-1])


def test_check_rejects_foreign_prompt():
    with pytest.raises(ValueError, match="not a synthetic task prompt"):
        check("mul:3*4=", "12")
    with pytest.raises(ValueError, match="has no '='"):
        split_prompt("no equals sign")


def test_deterministic_and_seeded():
    a, b, c = SyntheticSource(seed=1), SyntheticSource(seed=1), SyntheticSource(seed=2)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert [a[i] for i in range(50)] != [c[i] for i in range(50)]
    assert len(a) == 2**20
    with pytest.raises(IndexError):
        a[2**20]


def test_train_eval_disjoint():
    train = {split_prompt(SyntheticSource(split="train")[i])[0] for i in range(3000)}
    ev = SyntheticSource(split="eval")
    eval_prompts = {split_prompt(ev[i])[0] for i in range(len(ev))}
    assert len(eval_prompts) > 900
    assert not train & eval_prompts
    assert all(is_eval_prompt(p) for p in eval_prompts)
    assert not any(is_eval_prompt(p) for p in train)
    # every task shows up in eval
    assert {p.split(":")[0] if ":" in p else "add" for p in eval_prompts} == set(TASKS)


def test_parse_tasks():
    assert parse_tasks("") == tuple(TASKS)
    assert parse_tasks(None) == tuple(TASKS)
    assert parse_tasks(" rev, add ") == ("rev", "add")
    with pytest.raises(ValueError, match="unknown synthetic task.*mul.*known: add"):
        parse_tasks("add,mul")
    with pytest.raises(ValueError, match="unknown split"):
        SyntheticSource(split="test")


def test_unigram_entropy():
    h_all = unigram_entropy(num_examples=1000)
    h_add = unigram_entropy(num_examples=1000, tasks="add")
    # add uses 12 symbols + EOS
    assert 0 < h_add < math.log(13) < h_all < math.log(259)
    assert unigram_entropy(num_examples=1000) == h_all
