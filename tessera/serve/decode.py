"""``python -m tessera.serve.decode --config=llama:tiny --workdir=DIR`` plus one of:

  --prompt="417+38="        stream one completion to stdout
  --prompts_file=F.jsonl    one {"prompt": ...} (or a plain text line) per line; batches of
                            --batch_size, a progress bar, rows {"prompt", "completion", "tokens",
                            "finish_reason"} to --output (default stdout), written and fsynced
                            as each batch returns; --resume continues a killed run's --output
  --eval_synthetic=N        greedy-decode N held-out prompts of the embedded synthetic corpus and
                            print the accuracy that ``tessera.data.synthetic.check`` measures

Loads the latest checkpoint of the workdir (or ``--step``) onto the mesh of ``config.mesh``.
Sampling defaults come from ``config.decode``; the flags override them. Prefill / decode tokens/s
and the cache's bytes/token are printed to stderr at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO, TextIO

import numpy as np
from absl import flags
from ml_collections import config_flags

from tessera.cli import check_workdir, fail, run_main
from tessera.configs.base import ConfigDict
from tessera.data.synthetic import SyntheticSource, check, split_prompt
from tessera.files import write_atomic
from tessera.serve.engine import Decoder
from tessera.serve.outputs import Completion, DecodeStats
from tessera.serve.sampling import SamplingParams

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config: a packaged name (llama:tiny) or path/to/file.py[:arg].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt; its completion is streamed.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, 'File of prompts: {"prompt": ...} JSON or plain text, one per line.'
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "JSONL file for --prompts_file results (must not exist, unless --resume)."
)
_RESUME = flags.DEFINE_bool(
    "resume", False, "Continue --output: keep its complete rows, decode the prompts after them."
)
_EVAL = flags.DEFINE_integer(
    "eval_synthetic", None, "Decode N held-out synthetic prompts and print the accuracy."
)
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "Prompts per batch for files and evals. Default: config.decode."
)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Default: config.decode.max_new_tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 is greedy. Default: config.decode.")
_TOP_K = flags.DEFINE_integer("top_k", None, "0 keeps all tokens. Default: config.decode.")
_TOP_P = flags.DEFINE_float("top_p", None, "In (0, 1]. Default: config.decode.")
_MIN_P = flags.DEFINE_float("min_p", None, "In [0, 1). Default: config.decode.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed. Default: config.decode.seed.")
_STOP = flags.DEFINE_multi_string(
    "stop", [], "Stop string (repeatable; backslash escapes such as \\n are understood)."
)

EXAMPLES_SHOWN = 5


def read_prompts(path: str) -> list[str]:
    """Prompts of a file: a JSON object with a "prompt" per line, or plain text lines (a line
    that is not a JSON object, e.g. ``123`` or ``[1]``, is plain text).

    Blank lines are skipped; an object without a string "prompt" is an error naming its line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, or digits/nesting past json's limits
                row = None
            if isinstance(row, dict):
                if not isinstance(row.get("prompt"), str):
                    raise ValueError(f"{path}:{number}: JSON row has no string 'prompt' field")
                prompts.append(row["prompt"])
            else:
                prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def unescape(text: str) -> str:
    """Backslash escapes (``\\n``, ``\\t``, ``\\u00e9``) of a command-line string; other text
    is kept as it is."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def sampling_from_flags(decode_cfg: ConfigDict) -> SamplingParams:
    """config.decode with the sampling flags that were given (validated)."""
    return SamplingParams.from_config(
        decode_cfg,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        min_p=_MIN_P.value,
        seed=_SEED.value,
    )


def stream_one(
    decoder: Decoder,
    prompt: str,
    sampling: SamplingParams,
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    stats: DecodeStats | None = None,
    out: TextIO = sys.stdout,
) -> Completion:
    """Print ``prompt`` and then its completion as the tokens arrive."""
    decoder.check_lengths(decoder.encode([prompt]), max_new_tokens)
    out.write(prompt)
    out.flush()
    printed = ""

    def on_update(_: int, partial: Completion) -> None:
        nonlocal printed
        if partial.text.startswith(printed) and len(partial.text) > len(printed):
            out.write(partial.text[len(printed) :])
            out.flush()
            printed = partial.text

    (completion,) = decoder.generate(
        [prompt], sampling, max_new_tokens, stop=stop, on_update=on_update, stats=stats
    )
    out.write(completion.text[len(printed) :] + "\n")
    out.flush()
    return completion


def decode_many(
    decoder: Decoder,
    prompts: Sequence[str],
    sampling: SamplingParams,
    max_new_tokens: int,
    *,
    batch_size: int,
    stop: Sequence[str] = (),
    stats: DecodeStats | None = None,
    progress: bool = True,
    start: int = 0,
    on_batch: Callable[[list[Completion]], None] | None = None,
) -> list[Completion]:
    """Complete ``prompts[start:]`` in batches of ``batch_size`` with a progress bar (on a
    terminal); ``on_batch`` gets each batch's completions, in order, as soon as it returns.

    Every prompt is checked before the first batch runs, so bad input fails fast. Sampling is
    seeded by the prompt's index, so a run resumed at ``start`` gives the rows a whole run would.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[Completion] = []
    if start >= len(prompts):
        return results
    decoder.check_lengths(decoder.encode(prompts[start:]), max_new_tokens)
    with tqdm(
        total=len(prompts), initial=start, unit="prompt", disable=None if progress else True,
        file=sys.stderr,
    ) as bar:
        for first in range(start, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            done = decoder.generate(
                batch, sampling, max_new_tokens, stop=stop, first_row=first, stats=stats,
                batch_size=batch_size,
            )
            if on_batch is not None:
                on_batch(done)
            results += done
            bar.update(len(batch))
    return results


def eval_synthetic(
    decoder: Decoder,
    config: ConfigDict,
    num: int,
    sampling: SamplingParams,
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    stats: DecodeStats | None = None,
    out: TextIO = sys.stdout,
) -> tuple[int, int]:
    """Decode ``num`` held-out prompts of the synthetic eval split; print examples and accuracy.

    Returns (correct, num).
    """
    source = SyntheticSource(
        seed=config.data.seed, split="eval", tasks=config.data.synthetic_tasks
    )
    if not 0 < num <= len(source):
        raise ValueError(f"eval_synthetic must be in [1, {len(source)}], got {num}")
    examples = [split_prompt(source[i]) for i in range(num)]
    prompts = [p for p, _ in examples]
    completions = decode_many(
        decoder, prompts, sampling, max_new_tokens, batch_size=batch_size, stats=stats
    )
    correct = 0
    for i, ((prompt, answer), completion) in enumerate(zip(examples, completions)):
        ok = check(prompt, completion.text)
        correct += ok
        if i < EXAMPLES_SHOWN:
            verdict = "ok" if ok else f"wrong (want {answer})"
            shown = repr(completion.text)[1:-1]
            out.write(f"  {prompt}{shown}  [{verdict}]\n")
    out.write(f"synthetic eval: {correct}/{num} correct ({100 * correct / num:.1f}%)\n")
    out.flush()
    return correct, num


def row_lines(completions: Sequence[Completion]) -> str:
    """The output rows of ``completions``: one whole JSON line each."""
    return "".join(
        json.dumps(
            {
                "prompt": c.prompt,
                "completion": c.text,
                "tokens": c.tokens,
                "finish_reason": c.finish_reason,
            },
            ensure_ascii=False,
        )
        + "\n"
        for c in completions
    )


def output_settings(
    prompts: Sequence[str],
    sampling: SamplingParams,
    max_new_tokens: int,
    stop: Sequence[str],
    workdir: str,
    step: int,
) -> dict:
    """What an --output file's rows depend on; ``--resume`` refuses to continue with others."""
    digest = hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()
    return {
        "prompts": len(prompts),
        "prompts_sha256": digest,
        "sampling": dataclasses.asdict(sampling),
        "max_new_tokens": max_new_tokens,
        "stop": list(stop),
        "workdir": os.path.abspath(workdir),
        "step": step,
    }


def settings_path(output: str) -> str:
    """The file next to ``output`` that records the settings its rows were decoded with."""
    return output + ".settings.json"


def _fsync_write(f: BinaryIO, text: str) -> None:
    f.write(text.encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


def check_output(output: str, *, resume: bool) -> None:
    """An existing ``output`` is never overwritten: it is an error unless ``resume``."""
    if os.path.exists(output) and not resume:
        raise ValueError(
            f"output {output} already exists: pass --resume to continue it, or remove it"
        )


def open_output(
    output: str, prompts: Sequence[str], settings: dict, *, resume: bool
) -> tuple[BinaryIO, int]:
    """Open ``output`` for appending rows; returns (binary file, rows already done).

    A new output (and its settings file) is created; an existing one is an error unless
    ``resume``. Resuming checks the recorded settings, keeps the complete rows (each must be
    the row of the prompt at its index) and drops a truncated last line, which is redone.
    """
    check_output(output, resume=resume)
    meta = settings_path(output)
    if not os.path.exists(output):
        write_atomic(meta, json.dumps(settings, indent=1))
        return open(output, "xb"), 0
    if not os.path.isfile(meta):
        raise ValueError(f"cannot resume {output}: {meta} is missing (not a tessera decode output)")
    with open(meta, encoding="utf-8") as f:
        saved = json.load(f)
    differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if differ:
        shown = ", ".join(
            "the prompts" if k == "prompts_sha256" else f"{k} (was {saved.get(k)!r}, now "
            f"{settings.get(k)!r})" for k in differ
        )
        raise ValueError(f"cannot resume {output}: decoded with other settings: {shown}")
    with open(output, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.decode("utf-8", "replace").splitlines()
    if len(lines) > len(prompts):
        raise ValueError(f"cannot resume {output}: {len(lines)} rows for {len(prompts)} prompts")
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or row.get("prompt") != prompts[i]:
            raise ValueError(
                f"cannot resume {output}: line {i + 1} is not the row of prompt {i} "
                f"{prompts[i]!r}"
            )
    f = open(output, "r+b")
    f.truncate(len(complete))  # a line cut short by the kill is decoded again
    f.seek(len(complete))
    os.fsync(f.fileno())
    return f, len(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        fail("--config is required (e.g. --config=llama:tiny)")
    if not _WORKDIR.value:
        fail("--workdir is required")
    check_workdir(_WORKDIR.value, write=False)
    modes = [
        name
        for name, value in (
            ("--prompt", _PROMPT.value),
            ("--prompts_file", _PROMPTS_FILE.value),
            ("--eval_synthetic", _EVAL.value),
        )
        if value is not None
    ]
    if len(modes) != 1:
        fail("give exactly one of --prompt, --prompts_file, --eval_synthetic")
    if _PROMPT.value is not None and not _PROMPT.value:
        raise ValueError("prompt 0 is empty")
    sampling = sampling_from_flags(config.decode)
    max_new = _MAX_NEW.value if _MAX_NEW.value is not None else int(config.decode.max_new_tokens)
    stop = [unescape(s) for s in _STOP.value]
    prompts = read_prompts(_PROMPTS_FILE.value) if _PROMPTS_FILE.value else None
    if _RESUME.value and not (prompts is not None and _OUTPUT.value):
        fail("--resume continues an --output file of --prompts_file")
    if _OUTPUT.value:
        check_output(_OUTPUT.value, resume=_RESUME.value)  # before the model loads

    import jax

    from tessera.serve.loading import load_decoder

    decoder, step = load_decoder(config, _WORKDIR.value, step=_STEP.value)
    # Several processes (a pod) all run the decode, whose steps are collectives; process 0
    # alone prints and writes --output.
    main_process = jax.process_index() == 0
    if not main_process:
        sys.stdout = open(os.devnull, "w")
    log = lambda text: main_process and print(f"tessera: {text}", file=sys.stderr, flush=True)
    log(
        f"decoding with step {step} of {_WORKDIR.value} ({config.model.family}, "
        f"{decoder.spec.num_params() / 1e6:.2f}M params) on {decoder.mesh.devices.size} "
        f"{jax.devices()[0].platform} devices, mesh {dict(decoder.mesh.shape)}, tokenizer "
        f"{config.data.tokenizer}"
    )
    stats = DecodeStats()
    batch_size = config.decode.batch_size if _BATCH.value is None else _BATCH.value
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if _PROMPT.value is not None:
        stream_one(
            decoder, _PROMPT.value, sampling, max_new, stop=stop, stats=stats, out=sys.stdout
        )
    elif prompts is not None and _OUTPUT.value:
        settings = output_settings(prompts, sampling, max_new, stop, _WORKDIR.value, step)
        if main_process:
            f, done = open_output(_OUTPUT.value, prompts, settings, resume=_RESUME.value)
            write = lambda batch: _fsync_write(f, row_lines(batch))
        else:
            f, done, write = contextlib.nullcontext(), 0, lambda batch: None
        if jax.process_count() > 1:  # every process starts at process 0's row
            from jax.experimental import multihost_utils

            done = int(multihost_utils.broadcast_one_to_all(np.int32(done)))
        with f:
            if done:
                log(f"resuming {_OUTPUT.value}: {done} of {len(prompts)} rows already there")
            decode_many(
                decoder, prompts, sampling, max_new, batch_size=batch_size, stop=stop,
                stats=stats, start=done, on_batch=write,
                progress=main_process,
            )
        log(f"wrote {len(prompts) - done} completions to {_OUTPUT.value}")
    elif prompts is not None:

        def to_stdout(batch: list[Completion]) -> None:
            sys.stdout.write(row_lines(batch))
            sys.stdout.flush()

        decode_many(
            decoder, prompts, sampling, max_new, batch_size=batch_size, stop=stop,
            stats=stats, on_batch=to_stdout, progress=main_process,
        )
    else:
        eval_synthetic(
            decoder, config, _EVAL.value, sampling, max_new, batch_size=batch_size, stats=stats,
            out=sys.stdout,
        )
    for line in stats.lines():
        log(line)


if __name__ == "__main__":
    run_main(main)
