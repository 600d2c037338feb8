"""What decoding returns and counts: completions, cache sizes, timings, and the host-side
bookkeeping of each sequence (stop tokens, stop strings, streamed text)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tessera.data.tokenizers import Tokenizer


@dataclasses.dataclass
class Completion:
    """One prompt's result. ``tokens`` are the generated ids, without a final stop token;
    ``text`` their decoding, cut before a stop string. ``finish_reason``: ``"eos"`` (a stop
    token), ``"stop"`` (a stop string), ``"length"`` (max_new_tokens), None while running."""

    prompt: str | None
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str | None


@dataclasses.dataclass
class CacheInfo:
    """Size of one request's cache: ``batch`` rows of ``slots`` token slots. ``token_bytes``:
    arrays that grow with the slots (KV caches); ``state_bytes``: per-sequence state of a fixed
    size (recurrent state, bookkeeping)."""

    batch: int
    slots: int
    token_bytes: int
    state_bytes: int
    kinds: str

    @property
    def bytes(self) -> int:
        return self.token_bytes + self.state_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.token_bytes / (self.batch * self.slots)

    @property
    def bytes_per_sequence(self) -> float:
        """Fixed-size state per sequence (not counting per-token slots)."""
        return self.state_bytes / self.batch

    def describe(self) -> str:
        return (
            f"cache: {self.bytes_per_token:.0f} bytes/token + "
            f"{self.bytes_per_sequence / 1024:.1f} KiB/sequence of fixed state "
            f"({self.kinds}; {self.slots} slots)"
        )


@dataclasses.dataclass
class DecodeStats:
    """Counters accumulated over ``generate`` calls (pass the same object to several)."""

    prompts: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    compile_s: float = 0.0
    cache: CacheInfo | None = None
    # Per decode call (each up to decode_chunk steps): (steps run, seconds, slots of the cache it
    # ran on), compile time excluded.
    calls: list[tuple[int, float, int]] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary: prefill and decode tokens/s, the cache's bytes/token."""
        rate = lambda n, s: n / s if s > 0 else float("nan")
        out = [
            f"prefill: {self.prefill_tokens} tokens in {self.prefill_s:.3f} s "
            f"({rate(self.prefill_tokens, self.prefill_s):.1f} tok/s)",
            f"decode: {self.decode_tokens} tokens in {self.decode_s:.3f} s "
            f"({rate(self.decode_tokens, self.decode_s):.1f} tok/s, "
            f"{1e3 * rate(self.decode_s, self.decode_steps):.2f} ms/step)",
        ]
        if self.cache is not None:
            out.append(self.cache.describe())
        out.append(f"compile: {self.compile_s:.1f} s")
        return out


class HostRow:
    """Host-side bookkeeping of one sequence: tokens so far, stop strings, finish reason."""

    def __init__(
        self, prompt: str | None, ids: list[int], tokenizer: Tokenizer, stop: tuple[str, ...],
        stop_tokens: tuple[int, ...], budget: int,
    ):
        self.prompt, self.ids, self.tokenizer = prompt, ids, tokenizer
        self.stop, self.stop_tokens, self.budget = stop, stop_tokens, budget
        self.tokens: list[int] = []
        self.generated = 0
        self.finish: str | None = None
        self.cut: int | None = None  # text length before the stop string

    def feed(self, new: Sequence[int]) -> bool:
        """Take newly sampled tokens; returns whether anything changed."""
        if self.finish is not None or not len(new):
            return False
        start = len(self.tokens)
        for token in new:
            self.generated += 1
            if token in self.stop_tokens:
                self.finish = "eos"
                break
            self.tokens.append(int(token))
            if self.generated >= self.budget:
                self.finish = "length"
                break
        if self.stop:
            self._check_stop(start)
        return True

    def _check_stop(self, start: int) -> None:
        # No stop string ended before ``start``; find the first token that completes one.
        for k in range(start + 1, len(self.tokens) + 1):
            text = self.tokenizer.decode(self.tokens[:k])
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.tokens, self.cut, self.finish = self.tokens[:k], min(hits), "stop"
                return

    def completion(self) -> Completion:
        text = self.tokenizer.decode(self.tokens)
        if self.cut is not None:
            text = text[: self.cut]
        elif self.finish is None:
            # Still running: hold back what may yet become a stop string or a multi-byte char.
            text = text.rstrip("\ufffd")
            held = [
                n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:n])
            ]
            text = text[: len(text) - max(held, default=0)]
        return Completion(self.prompt, self.ids, list(self.tokens), text, self.finish)
