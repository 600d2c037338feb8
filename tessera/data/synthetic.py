"""The embedded default corpus: rule-based one-line tasks, generated in code.

Every example is `prompt + answer` with the prompt ending in `=`:

    add    417+38=455         operands 0..999
    copy   copy:hello=hello   lowercase words of 3..8 letters
    rev    rev:hello=olleh
    sort   sort:dcab=abcd

A tiny byte-level model learns these in a few hundred steps, and `check` recomputes the right
answer from a prompt, so decode output can be scored. Examples are generated on the fly from
`(seed, split, index)` with a counter-based hash RNG: no download, no state, same text everywhere.
A prompt belongs to the eval split iff its CRC32 is divisible by 50, so train and eval never share
a prompt.
"""

from __future__ import annotations

import hashlib
import math
import operator
import re
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tessera.data.tokenizers import ByteTokenizer, Tokenizer

_EVAL_EVERY = 50
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_SPLITS = ("train", "eval")


class _Rng:
    """Deterministic integer stream keyed by a tuple of ints (blake2b in counter mode)."""

    def __init__(self, *key: int | str):
        self._key = "/".join(map(str, key)).encode()
        self._block = 0
        self._buf: list[int] = []

    def below(self, n: int) -> int:
        """Uniform-enough int in [0, n) (64-bit draw, modulo bias < n / 2**64)."""
        if not self._buf:
            digest = hashlib.blake2b(self._key + b"#%d" % self._block).digest()
            self._buf = list(struct.unpack("<8Q", digest))
            self._block += 1
        return self._buf.pop() % n


def _word(rng: _Rng) -> str:
    return "".join(_LETTERS[rng.below(26)] for _ in range(3 + rng.below(6)))


@dataclass(frozen=True)
class _Task:
    pattern: re.Pattern[str]  # full-matches a prompt of this task
    draw: Callable[[_Rng], str]  # rng -> prompt
    solve: Callable[[re.Match[str]], str]  # matched prompt -> answer


def _word_task(name: str, solve: Callable[[str], str]) -> _Task:
    """A task `name:<word>=<solve(word)>` over lowercase words of 3..8 letters."""
    return _Task(
        re.compile(rf"{name}:([a-z]{{3,8}})="),
        lambda r: f"{name}:{_word(r)}=",
        lambda m: solve(m[1]),
    )


TASKS: dict[str, _Task] = {
    "add": _Task(
        re.compile(r"(\d{1,3})\+(\d{1,3})="),
        lambda r: f"{r.below(1000)}+{r.below(1000)}=",
        lambda m: str(int(m[1]) + int(m[2])),
    ),
    "copy": _word_task("copy", lambda w: w),
    "rev": _word_task("rev", lambda w: w[::-1]),
    "sort": _word_task("sort", lambda w: "".join(sorted(w))),
}


def parse_tasks(tasks: str | Sequence[str] | None) -> tuple[str, ...]:
    """Task names from a comma-separated string or a sequence; empty/None means all tasks."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks or ())
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(
            f"unknown synthetic task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}"
        )
    return tuple(names) or tuple(TASKS)


def is_eval_prompt(prompt: str) -> bool:
    """Whether `prompt` belongs to the held-out eval split (1 prompt in 50, by CRC32)."""
    return zlib.crc32(prompt.encode("utf-8")) % _EVAL_EVERY == 0


def _match(prompt: str) -> tuple[str, re.Match[str]]:
    """(task name, match) of the task whose pattern full-matches `prompt`."""
    for name, task in TASKS.items():
        m = task.pattern.fullmatch(prompt)
        if m:
            return name, m
    raise ValueError(f"not a synthetic task prompt: {prompt!r}")


def split_prompt(example: str) -> tuple[str, str]:
    """Splits `prompt=answer` into (`prompt=`, `answer`)."""
    prompt, sep, answer = example.partition("=")
    if not sep:
        raise ValueError(f"synthetic example has no '=': {example!r}")
    return prompt + sep, answer


def strip_rule(example: str) -> tuple[str, str]:
    """(rule name, the example without its `name:` prefix): `rev:hello=olleh` -> ("rev",
    "hello=olleh"), `417+38=455` -> ("add", "417+38=455")."""
    name, _ = _match(split_prompt(example)[0])
    return name, example.removeprefix(f"{name}:")


def check(prompt: str, completion: str) -> bool:
    """True iff `completion` (up to its first newline) is the right answer to `prompt`."""
    name, m = _match(prompt)
    return completion.split("\n", 1)[0] == TASKS[name].solve(m)


class SyntheticSource:
    """Random-access source of synthetic examples, deterministic in `(seed, split)`.

    `source[i]` is a `str` like `rev:hello=olleh`. Train and eval are disjoint by prompt: an index
    whose draw lands in the other split is re-drawn with the next attempt counter.
    """

    def __init__(
        self,
        seed: int = 0,
        split: str = "train",
        tasks: str | Sequence[str] | None = None,
        length: int | None = None,
    ):
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(_SPLITS)}")
        self.seed = seed
        self.split = split
        self.tasks = parse_tasks(tasks)
        self._length = length if length is not None else (2**20 if split == "train" else 2**10)
        self._want_eval = split == "eval"

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> str:
        i = operator.index(index)
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for SyntheticSource of length {self._length}")
        attempt = 0
        while True:
            rng = _Rng(self.seed, self.split, i, attempt)
            task = TASKS[self.tasks[rng.below(len(self.tasks))]]
            prompt = task.draw(rng)
            if is_eval_prompt(prompt) == self._want_eval:
                return prompt + task.solve(task.pattern.fullmatch(prompt))
            attempt += 1


def unigram_entropy(
    num_examples: int = 4096,
    tokenizer: Tokenizer | None = None,
    *,
    seed: int = 0,
    tasks: str | Sequence[str] | None = None,
) -> float:
    """Unigram entropy (nats/token) of the train token stream, one EOS after each example.

    This is the loss of a model that ignores context; a model that learned the tasks goes well
    below it.
    """
    tokenizer = tokenizer or ByteTokenizer()
    source = SyntheticSource(seed=seed, split="train", tasks=tasks)
    counts: Counter[int] = Counter()
    for i in range(num_examples):
        counts.update(tokenizer.encode(source[i]))
        counts[tokenizer.eos_id] += 1
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())
