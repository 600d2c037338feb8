"""Tokenizers: text <-> token ids.

Every tokenizer exposes `encode`, `decode` and the ids `pad_id`, `bos_id`, `eos_id`, plus
`vocab_size`. The pipeline adds BOS/EOS itself, so `encode` never does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Tokenizer(Protocol):
    """What the data pipeline and the decode loop need from a tokenizer."""

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, byte b -> b + 3 (vocab 259)."""

    _OFFSET = 3

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def vocab_size(self) -> int:
        return 256 + self._OFFSET

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` shifted past the special ids; no BOS/EOS added."""
        return [b + self._OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of `encode`; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        out = bytearray()
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"token id {token} out of range for the byte tokenizer "
                    f"(vocab_size {self.vocab_size})"
                )
            if token >= self._OFFSET:
                out.append(token - self._OFFSET)
        return out.decode("utf-8", errors="replace")


_TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer registered under `name` (`data.tokenizer` in the config)."""
    if name not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(sorted(_TOKENIZERS))}")
    return _TOKENIZERS[name]()
