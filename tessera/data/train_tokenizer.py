"""Train a SentencePiece tokenizer on local text.

  python -m tessera.data.train_tokenizer --input=GLOB[,GLOB...] --vocab_size=N --output=PREFIX
      [--model_type=unigram|bpe] [--text_field=text] [--max_sentences=0] [--byte_fallback]
      [--character_coverage=0.9995]

Reads every file the globs match, in any format of `tessera.data.files` (a `.jsonl`, `.parquet`
or `.array_record` file gives the `--text_field` string of each record, any other file is UTF-8
text); each non-blank line of text is one training sentence.
Writes PREFIX.model and PREFIX.vocab (a `.model` suffix on --output is dropped), trained under a
temporary name beside them and renamed at the end, so a failed or interrupted run leaves no
partial model. The model works as `data.tokenizer="spm:PREFIX.model"`.

The special pieces have fixed ids, the layout of T5 and seqio's vocabularies plus a BOS:
pad=0 (`<pad>`), eos=1 (`</s>`), unk=2 (`<unk>`), bos=3 (`<s>`); learned pieces follow (after the
256 byte pieces with --byte_fallback, which encodes characters outside the vocabulary as their
UTF-8 bytes instead of `<unk>`). Text is not normalized and runs of spaces are kept, so decoding
gives back the text for everything the vocabulary covers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from tessera.data.files import expand_paths, open_reader

SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": 3}
MODEL_TYPES = ("unigram", "bpe")
_MAX_SENTENCE_BYTES = 1 << 14  # longer lines are skipped by sentencepiece (its default: 4192)


@dataclasses.dataclass
class TrainStats:
    """What a training run read and wrote."""

    model_path: str = ""
    vocab_size: int = 0
    learned_pieces: int = 0  # pieces that are neither special nor bytes
    files: int = 0
    sentences: int = 0
    bytes: int = 0


def expand_inputs(patterns: str | Sequence[str]) -> list[str]:
    """The files `patterns` (globs, or one comma-separated string of them) match, each once,
    sorted (`tessera.data.files.expand_paths`). A pattern that matches no file is a
    FileNotFoundError."""
    if not isinstance(patterns, str):
        patterns = ",".join(patterns)
    if not patterns.strip(","):
        raise ValueError("--input names no files (--input=GLOB[,GLOB...])")
    return expand_paths(patterns)


def _file_lines(path: str, text_field: str) -> Iterator[str]:
    """The non-blank lines of the documents in `path`, in any format `tessera.data.files` reads
    (text lines; the `text_field` of jsonl lines, parquet rows or array_record records)."""
    reader = open_reader(path, text_field)
    for i in range(len(reader)):
        for sentence in reader[i].splitlines():
            if sentence.strip():
                yield sentence


def _sentences(
    files: Sequence[str], text_field: str, stats: TrainStats, log: Callable[[str], None]
) -> Iterator[str]:
    """Every sentence of `files`, counting into `stats`; a progress line at most every 5 s."""
    last = time.monotonic()
    for path in files:
        for sentence in _file_lines(path, text_field):
            stats.sentences += 1
            yield sentence
        stats.files += 1
        stats.bytes += os.path.getsize(path)
        if time.monotonic() - last > 5 or stats.files == len(files):
            last = time.monotonic()
            log(
                f"read {stats.files}/{len(files)} files, {stats.sentences} lines, "
                f"{stats.bytes / 1e6:.1f} MB"
            )


def _user_error(e: RuntimeError, vocab_size: int) -> ValueError:
    """sentencepiece's training error as a one-line ValueError in terms of the flags."""
    text = str(e)
    if m := re.search(r"Vocabulary size too high \(\d+\)\. .* a value <= (\d+)", text):
        return ValueError(
            f"--vocab_size={vocab_size} is too large for this text: it yields at most "
            f"{m.group(1)} pieces (lower --vocab_size or give more text)"
        )
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", text):
        return ValueError(
            f"--vocab_size={vocab_size} is too small for this text: its characters, the "
            f"special pieces and the byte pieces (--byte_fallback) need {m.group(1)} (raise "
            "--vocab_size or lower --character_coverage)"
        )
    line = next((s for s in text.splitlines() if s.strip()), type(e).__name__)
    return ValueError(f"sentencepiece training failed: {line}")


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def train_tokenizer(
    inputs: str | Sequence[str],
    vocab_size: int,
    output: str,
    *,
    model_type: str = "unigram",
    text_field: str = "text",
    max_sentences: int = 0,
    byte_fallback: bool = False,
    character_coverage: float = 0.9995,
    log: Callable[[str], None] | None = None,
) -> TrainStats:
    """Train a SentencePiece model on the files `inputs` match (see the module doc) and write
    `output`.model and `output`.vocab; returns what was read and written. `max_sentences` > 0:
    train on that many lines sampled from all of them (all are read). Bad arguments, no files,
    no text, and a `vocab_size` the text cannot fill are ValueError / FileNotFoundError, and
    no file is left at `output` then."""
    try:
        import sentencepiece as spm
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("training a tokenizer needs `sentencepiece` (pip install it)") from e
    from tessera.data.tokenizers import SentencePieceTokenizer

    log = log or (lambda line: None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"--model_type={model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if vocab_size < len(SPECIAL_IDS) + 1:
        raise ValueError(f"--vocab_size={vocab_size} must be at least {len(SPECIAL_IDS) + 1}")
    if max_sentences < 0 or 0 < max_sentences <= 100:  # sentencepiece's own lower bound
        raise ValueError(
            f"--max_sentences={max_sentences} must be 0 (all lines) or more than 100"
        )
    if not 0 < character_coverage <= 1:
        raise ValueError(f"--character_coverage={character_coverage} must be in (0, 1]")
    if not output or output.endswith(os.sep):
        raise ValueError(f"--output={output!r} must be a file prefix such as out/tok")
    prefix = output[: -len(".model")] if output.endswith(".model") else output
    files = expand_inputs(inputs)
    stats = TrainStats()
    sentences = _sentences(files, text_field, stats, log)
    first = next(sentences, None)  # also surfaces a bad first file before training starts
    if first is None:
        raise ValueError(f"--input has no text: {len(files)} files, all empty or blank")

    errors: list[Exception] = []  # raised while sentencepiece reads: re-raised after it

    def all_sentences() -> Iterator[str]:
        yield first
        try:
            yield from sentences
        except (ValueError, OSError) as e:
            errors.append(e)

    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(prefix)}.tmp-{os.getpid()}")
    log(f"training a {model_type} SentencePiece model, vocab_size {vocab_size}")
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=all_sentences(),
                model_prefix=tmp,
                model_type=model_type,
                vocab_size=vocab_size,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                max_sentence_length=_MAX_SENTENCE_BYTES,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                pad_piece="<pad>",
                eos_piece="</s>",
                unk_piece="<unk>",
                bos_piece="<s>",
                minloglevel=2,
                **SPECIAL_IDS,
            )
        except RuntimeError as e:
            if errors:
                raise errors[0] from None
            raise _user_error(e, vocab_size) from None
        if errors:
            raise errors[0]
        SentencePieceTokenizer(tmp + ".model")  # loads, with pad, bos and eos defined
        processor = spm.SentencePieceProcessor(model_file=tmp + ".model")
        stats.vocab_size = int(processor.get_piece_size())
        stats.learned_pieces = sum(
            1
            for i in range(stats.vocab_size)
            if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i))
        )
        os.replace(tmp + ".vocab", prefix + ".vocab")
        os.replace(tmp + ".model", prefix + ".model")  # last: a .model is always complete
    finally:
        _remove(tmp + ".model", tmp + ".vocab")
    stats.model_path = prefix + ".model"
    return stats


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.data.train_tokenizer",
        description="Train a SentencePiece tokenizer on local .txt / .jsonl files.",
    )
    parser.add_argument("--input", required=True, help="GLOB[,GLOB...] of .txt / .jsonl files")
    parser.add_argument("--vocab_size", type=int, required=True, help="pieces in the model")
    parser.add_argument("--output", required=True, help="PREFIX: writes PREFIX.model/.vocab")
    parser.add_argument("--model_type", default="unigram", choices=MODEL_TYPES)
    parser.add_argument("--text_field", default="text", help="field of .jsonl records")
    parser.add_argument(
        "--max_sentences", type=int, default=0,
        help="train on this many lines (> 100) sampled from the input (default 0: all)",
    )
    parser.add_argument(
        "--byte_fallback", action="store_true",
        help="encode characters outside the vocabulary as UTF-8 byte pieces, not <unk>",
    )
    parser.add_argument(
        "--character_coverage", type=float, default=0.9995,
        help="share of the characters the vocabulary covers (rarer ones: <unk> or bytes)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (argv without the program name; default sys.argv[1:]): trains, prints
    a summary line to stdout and progress lines to stderr; a user error is one line and exit 2."""
    from tessera.cli import USER_ERRORS, error_line, fail

    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    start = time.monotonic()
    try:
        stats = train_tokenizer(
            args.input,
            args.vocab_size,
            args.output,
            model_type=args.model_type,
            text_field=args.text_field,
            max_sentences=args.max_sentences,
            byte_fallback=args.byte_fallback,
            character_coverage=args.character_coverage,
            log=lambda line: print(f"train_tokenizer: {line}", file=sys.stderr, flush=True),
        )
    except USER_ERRORS as e:
        fail(error_line(e))
    ids = ", ".join(f"{k[:-3]}={v}" for k, v in SPECIAL_IDS.items())
    print(
        f"wrote {stats.model_path} ({args.model_type}, vocab_size {stats.vocab_size}: "
        f"{stats.learned_pieces} learned pieces; {ids}) from {stats.files} files, "
        f"{stats.sentences} lines, {stats.bytes} bytes in {time.monotonic() - start:.1f} s; "
        f"use it as data.tokenizer=spm:{stats.model_path}"
    )


if __name__ == "__main__":
    main()
