"""Tokenizers: text <-> token ids.

Every tokenizer exposes `encode`, `decode` and the ids `pad_id`, `bos_id`, `eos_id`, plus
`vocab_size`. The pipeline adds BOS/EOS itself, so `encode` never does. `bos_id` is None for a
tokenizer whose documents start without a BOS token (nothing is prepended then).

`get_tokenizer(name, base_dir)` builds one from `data.tokenizer`: `"byte"` (`ByteTokenizer`),
`"hf:PATH"` (`HFTokenizer`: a Hugging Face `tokenizer.json`, or a directory holding one) or
`"spm:PATH"` (`SentencePieceTokenizer`: a SentencePiece `.model` file, or a directory holding
`tokenizer.model`). A relative PATH is taken relative to `base_dir`, the workdir, so an imported
workdir's config says `hf:tokenizer` or `spm:tokenizer`. The Hugging Face files beside either
kind (`tokenizer_config.json`, `special_tokens_map.json`) name its special tokens.

`check_vocab(tokenizer, model_vocab_size)` is the up-front check that every id the tokenizer
can produce has an embedding row; training and decode run it where they build the tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
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

    def __repr__(self) -> str:
        return "ByteTokenizer()"


HF_PREFIX = "hf:"
SPM_PREFIX = "spm:"
HF_TOKENIZER_FILE = "tokenizer.json"
SPM_MODEL_FILE = "tokenizer.model"
# Beside the tokenizer file; special_tokens_map.json wins where both name a token (as in
# transformers).
_SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token")


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


def read_special_tokens(directory: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(tokenizer_config.json's content, the special tokens named) from the Hugging Face files
    in `directory`, either absent: ``{"bos_token"|"eos_token"|"pad_token": text}`` for the
    tokens named (a string or ``{"content": ...}``) in tokenizer_config.json or
    special_tokens_map.json, the latter winning."""
    config: dict[str, Any] = {}
    tokens: dict[str, str] = {}
    for name in _SPECIAL_TOKEN_FILES:
        spec_path = os.path.join(directory, name)
        if not os.path.isfile(spec_path):
            continue
        data = _read_json(spec_path)
        if name == "tokenizer_config.json":
            config = data
        for key in _SPECIAL_KEYS:
            content = _token_content(data.get(key))
            if content is not None:
                tokens[key] = content
    return config, tokens


def special_ids(
    where: str,
    directory: str,
    token_to_id: Callable[[str], int | None],
    defaults: Mapping[str, int | None] | None = None,
) -> tuple[int, int | None, int, dict[str, str]]:
    """(pad_id, bos_id, eos_id, special tokens) of a tokenizer whose file `where` lies in
    `directory`, from the special tokens the Hugging Face files there name
    (`read_special_tokens`), else from `defaults` (``{"bos_token": id or None, ...}``, the
    tokenizer's own ids). `token_to_id` maps a token's text to its id (None: not in the vocab,
    an error naming it). EOS is required; PAD falls back to EOS; BOS is None when there is none
    or tokenizer_config.json says ``add_bos_token: false``."""
    config, tokens = read_special_tokens(directory)
    ids: dict[str, int | None] = dict(defaults or {})
    for key, token in tokens.items():
        token_id = token_to_id(token)
        if token_id is None:
            raise ValueError(f"{where}: the {key} {token!r} is not in the tokenizer's vocab")
        ids[key] = int(token_id)
    eos = ids.get("eos_token")
    if eos is None:
        source = "" if defaults is None else "in the model or "
        raise ValueError(
            f"{where}: no eos_token {source}in {' or '.join(_SPECIAL_TOKEN_FILES)} beside it; "
            "tessera needs one to end documents and to stop decoding"
        )
    pad = ids.get("pad_token")
    bos = ids.get("bos_token") if config.get("add_bos_token", True) is not False else None
    return (eos if pad is None else pad), bos, eos, tokens


def _tokenizer_file(path: str, file_name: str, kind: str) -> str:
    """`path` itself, or `path/file_name` when `path` is a directory; FileNotFoundError when
    there is no such file."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        file = os.path.join(path, file_name)
        if not os.path.isfile(file):
            extra = ""
            for other, prefix in ((SPM_MODEL_FILE, SPM_PREFIX), (HF_TOKENIZER_FILE, HF_PREFIX)):
                if other != file_name and os.path.isfile(os.path.join(path, other)):
                    extra = f" (it has a {other}: name it {prefix}{path})"
            raise FileNotFoundError(f"no {file_name} in {path}{extra}")
        return file
    if os.path.isfile(path):
        return path
    raise FileNotFoundError(f"{kind} tokenizer {path} does not exist")


class _FileTokenizer:
    """The ids a file-based tokenizer (`HFTokenizer`, `SentencePieceTokenizer`) sets in its
    constructor: `_pad`, `_bos`, `_eos` (`special_ids`) and `_vocab_size`."""

    _pad: int
    _bos: int | None
    _eos: int
    _vocab_size: int

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
        """One past the largest id the tokenizer has (added tokens included)."""
        return self._vocab_size


class HFTokenizer(_FileTokenizer):
    """A Hugging Face `tokenizers` tokenizer read from a `tokenizer.json` (offline).

    `path`: the tokenizer.json file, or a directory holding it. The special tokens come from
    `tokenizer_config.json` / `special_tokens_map.json` beside it (`bos_token`, `eos_token`,
    `pad_token`: a string or `{"content": ...}`); `eos_token` is required, `pad_id` falls back to
    `eos_id`, and `bos_id` is None when there is no `bos_token` or `add_bos_token` is false.
    `encode` adds no special tokens and applies no truncation or padding; `decode` skips special
    tokens and ids the tokenizer does not have (such as a model's padded vocabulary rows).
    """

    def __init__(self, path: str):
        file = _tokenizer_file(path, HF_TOKENIZER_FILE, "Hugging Face")
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
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        self._pad, self._bos, self._eos, self.special_tokens = special_ids(
            file, os.path.dirname(file), self._tok.token_to_id
        )


    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS or other special tokens are added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens skipped."""
        return self._tok.decode([int(t) for t in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece model (the `sentencepiece` package), e.g. Llama 2's or T5's
    `tokenizer.model`, or one `python -m tessera.data.train_tokenizer` trained.

    `path`: the `.model` file, or a directory holding `tokenizer.model`. The special ids are the
    model's own (`bos_id()` / `eos_id()` / `pad_id()`, -1 meaning none), overridden by the
    `bos_token` / `eos_token` / `pad_token` a Hugging Face `tokenizer_config.json` /
    `special_tokens_map.json` beside it names; `add_bos_token: false` there means no BOS. An EOS
    is required, `pad_id` falls back to `eos_id`, `bos_id` is None without one. `vocab_size` is
    the model's piece count. `encode` adds no BOS/EOS; `decode` skips the special ids, control
    pieces and ids at or past the piece count (a model's padded vocabulary rows).
    """

    def __init__(self, path: str):
        file = _tokenizer_file(path, SPM_MODEL_FILE, "SentencePiece")
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError(
                "spm: tokenizers need the `sentencepiece` package (pip install sentencepiece)"
            ) from e
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_file=file)
        except (OSError, RuntimeError) as e:
            line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot load the SentencePiece model {file}: {line}") from None
        self.path = file
        self._vocab_size = int(self._sp.get_piece_size())
        own = {
            "bos_token": self._sp.bos_id(),
            "eos_token": self._sp.eos_id(),
            "pad_token": self._sp.pad_id(),
        }
        self._pad, self._bos, self._eos, self.special_tokens = special_ids(
            file,
            os.path.dirname(file),
            self._piece_id,
            {key: (None if i < 0 else int(i)) for key, i in own.items()},
        )
        self._skip = frozenset(
            {self._pad, self._eos, *([] if self._bos is None else [self._bos])}
        )

    def _piece_id(self, piece: str) -> int | None:
        token_id = int(self._sp.piece_to_id(piece))  # the unk id for an unknown piece
        if not 0 <= token_id < self._vocab_size or self._sp.id_to_piece(token_id) != piece:
            return None
        return token_id


    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`; no BOS/EOS added."""
        return [int(t) for t in self._sp.encode(text, out_type=int)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`: special ids and ids past the piece count are skipped; a negative
        id is a ValueError."""
        keep = []
        for token in ids:
            token = int(token)
            if token < 0:
                raise ValueError(f"token id {token} is negative")
            if token < self._vocab_size and token not in self._skip:
                keep.append(token)
        return self._sp.decode(keep)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, name: str | None = None) -> None:
    """Raise ValueError when `tokenizer` has more ids than the model embeds (`model.vocab_size`):
    some text would encode to ids the model has no row for. `name` (default the tokenizer's
    repr), such as the config's `data.tokenizer`, names it in the message. A model vocabulary
    larger than the tokenizer's is fine (padded rows)."""
    if tokenizer.vocab_size > model_vocab_size:
        label = repr(name) if name else repr(tokenizer)
        raise ValueError(
            f"tokenizer {label} has {tokenizer.vocab_size} ids but "
            f"model.vocab_size is {model_vocab_size}: raise model.vocab_size to at least "
            f"{tokenizer.vocab_size} or use a smaller tokenizer"
        )


_TOKENIZERS = {"byte": ByteTokenizer}
_PATH_TOKENIZERS = {HF_PREFIX: HFTokenizer, SPM_PREFIX: SentencePieceTokenizer}


def resolve_path(name: str, base_dir: str | None = None) -> str:
    """The path of an `hf:PATH` or `spm:PATH` tokenizer name: PATH, or `base_dir/PATH` when
    PATH is relative and `base_dir` is given."""
    prefix, _, path = name.partition(":")
    path = os.path.expanduser(path)
    if not path:
        file = HF_TOKENIZER_FILE if prefix + ":" == HF_PREFIX else SPM_MODEL_FILE
        raise ValueError(f"tokenizer {name!r} names no path ({prefix}:DIR or {prefix}:DIR/{file})")
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return path


def get_tokenizer(name: str, base_dir: str | None = None, data_cfg: Any = None) -> Tokenizer:
    """The tokenizer `name` (`data.tokenizer` in the config) names: `"byte"`; `"hf:PATH"` with
    PATH a tokenizer.json or a directory holding one; `"spm:PATH"` with PATH a SentencePiece
    `.model` file or a directory holding `tokenizer.model` (a relative PATH is taken relative to
    `base_dir`, the workdir, to the current directory without `base_dir`); or `"seqio"`: the
    targets vocabulary of the seqio task `data_cfg.task` (the `data` config section)."""
    if name == "seqio":
        from tessera.data.seqio_source import seqio_tokenizer

        return seqio_tokenizer(data_cfg)
    for prefix, cls in _PATH_TOKENIZERS.items():
        if name.startswith(prefix):
            return cls(resolve_path(name, base_dir))
    if name not in _TOKENIZERS:
        known = ", ".join(
            [*sorted(_TOKENIZERS), *(f"{p}<path>" for p in _PATH_TOKENIZERS), "seqio"]
        )
        raise ValueError(f"unknown tokenizer {name!r}; known: {known}")
    return _TOKENIZERS[name]()
