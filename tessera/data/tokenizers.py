"""Tokenizers: text <-> token ids.

Every tokenizer exposes `encode`, `decode` and the ids `pad_id`, `bos_id`, `eos_id`, plus
`vocab_size`. The pipeline adds BOS/EOS itself, so `encode` never does. `bos_id` is None for a
tokenizer whose documents start without a BOS token (nothing is prepended then).

`get_tokenizer(name, base_dir)` builds one from `data.tokenizer`: `"byte"` (`ByteTokenizer`) or
`"hf:PATH"` (`HFTokenizer`: a Hugging Face `tokenizer.json`, or a directory holding one; a
relative PATH is taken relative to `base_dir`, the workdir, so an imported workdir's config says
`hf:tokenizer`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, Protocol


class Tokenizer(Protocol):
    """What the data pipeline and the decode loop need from a tokenizer."""

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

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


HF_TOKENIZER_FILE = "tokenizer.json"
# Beside tokenizer.json; special_tokens_map.json wins where both name a token (as in transformers).
_SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _token_content(value: Any) -> str | None:
    """A special token as the config files write it: a string, {"content": ...} or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a `tokenizer.json` (offline).

    `path`: the tokenizer.json file, or a directory holding it. The special tokens come from
    `tokenizer_config.json` / `special_tokens_map.json` beside it (`bos_token`, `eos_token`,
    `pad_token`: a string or `{"content": ...}`); `eos_token` is required, `pad_id` falls back to
    `eos_id`, and `bos_id` is None when there is no `bos_token` or `add_bos_token` is false.
    `encode` adds no special tokens and applies no truncation or padding; `decode` skips special
    tokens and ids the tokenizer does not have (such as a model's padded vocabulary rows).
    """

    def __init__(self, path: str):
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            file = os.path.join(path, HF_TOKENIZER_FILE)
            if not os.path.isfile(file):
                extra = ""
                if os.path.isfile(os.path.join(path, "tokenizer.model")):
                    extra = " (it has a SentencePiece tokenizer.model, which is not supported)"
                raise FileNotFoundError(f"no {HF_TOKENIZER_FILE} in {path}{extra}")
        elif os.path.isfile(path):
            file = path
        else:
            raise FileNotFoundError(f"tokenizer {path} does not exist")
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError(
                "hf: tokenizers need the `tokenizers` package (pip install tokenizers)"
            ) from e
        try:
            self._tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise ValueError(f"cannot load the Hugging Face tokenizer {file}: {e}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.path = file

        here = os.path.dirname(file)
        config: dict[str, Any] = {}
        tokens: dict[str, str | None] = {}
        for name in _SPECIAL_TOKEN_FILES:
            spec_path = os.path.join(here, name)
            if not os.path.isfile(spec_path):
                continue
            data = _read_json(spec_path)
            if name == "tokenizer_config.json":
                config = data
            for key in ("bos_token", "eos_token", "pad_token"):
                content = _token_content(data.get(key))
                if content is not None:
                    tokens[key] = content
        self.special_tokens = tokens

        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        eos = self._id(tokens.get("eos_token"), "eos_token")
        if eos is None:
            raise ValueError(
                f"{file}: no eos_token in {' or '.join(_SPECIAL_TOKEN_FILES)} beside it; "
                "tessera needs one to end documents and to stop decoding"
            )
        self._eos = eos
        pad = self._id(tokens.get("pad_token"), "pad_token")
        self._pad = eos if pad is None else pad
        bos = self._id(tokens.get("bos_token"), "bos_token")
        self._bos = bos if config.get("add_bos_token", True) is not False else None

    def _id(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.path}: the {key} {token!r} is not in the tokenizer's vocab")
        return int(token_id)

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def vocab_size(self) -> int:
        """One past the largest id (added tokens included)."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS or other special tokens are added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens skipped."""
        return self._tok.decode([int(t) for t in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


_TOKENIZERS = {"byte": ByteTokenizer}
HF_PREFIX = "hf:"


def resolve_hf_path(name: str, base_dir: str | None = None) -> str:
    """The path of an `hf:PATH` tokenizer name: PATH, or `base_dir/PATH` when PATH is relative
    and `base_dir` is given."""
    path = os.path.expanduser(name[len(HF_PREFIX) :])
    if not path:
        raise ValueError(f"tokenizer {name!r} names no path (hf:DIR or hf:DIR/tokenizer.json)")
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return path


def get_tokenizer(name: str, base_dir: str | None = None, data_cfg: Any = None) -> Tokenizer:
    """The tokenizer `name` (`data.tokenizer` in the config) names: `"byte"`, or `"hf:PATH"` with
    PATH a tokenizer.json or a directory holding one, relative to `base_dir` (the workdir) when
    it is not absolute (to the current directory without `base_dir`), or `"seqio"`: the targets
    vocabulary of the seqio task `data_cfg.task` (the `data` config section)."""
    if name == "seqio":
        from tessera.data.seqio_source import seqio_tokenizer

        return seqio_tokenizer(data_cfg)
    if name.startswith(HF_PREFIX):
        return HFTokenizer(resolve_hf_path(name, base_dir))
    if name not in _TOKENIZERS:
        known = ", ".join([*sorted(_TOKENIZERS), f"{HF_PREFIX}<path>", "seqio"])
        raise ValueError(f"unknown tokenizer {name!r}; known: {known}")
    return _TOKENIZERS[name]()
