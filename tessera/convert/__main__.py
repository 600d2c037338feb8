"""Hugging Face import / export.

  python -m tessera.convert import --hf_dir=DIR --workdir=OUT [--mesh=fsdp=2,tensor=2]
      [--dtype=float32] [--compute_dtype=bfloat16] [--set=model.dtype=bfloat16 ...]
  python -m tessera.convert export --workdir=OUT --hf_dir=DIR [--step=N] [--dtype=float32]
      [--max_shard_size=5GB]

``import`` writes OUT/checkpoints/0, OUT/config.json and OUT/config.py, so that
``python -m tessera.train --config=OUT/config.py --workdir=OUT`` fine-tunes the model and
``python -m tessera.serve.decode --config=OUT/config.py --workdir=OUT`` decodes with it.

``import`` keeps the checkpoint's dtype (config.json ``dtype``, or ``torch_dtype``; float32 when
neither is written) for the parameters and computes in it, as transformers does, so greedy
decoding follows transformers'. ``--compute_dtype=bfloat16`` (or ``--set=model.dtype=bfloat16``,
or later ``--config=OUT/config.py:model.dtype=bfloat16``) computes in bfloat16: faster on TPU, and
greedy continuations drift from transformers' after a few dozen tokens.
"""

from __future__ import annotations

import re

from absl import flags

from tessera.cli import fail, run_main

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (read or written).")
_WORKDIR = flags.DEFINE_string("workdir", None, "tessera workdir (written or read).")
_MESH = flags.DEFINE_string(
    "mesh", "", "import: mesh sizes for the config, e.g. 'fsdp=2,tensor=2' (data fills the rest)."
)
_DTYPE = flags.DEFINE_string(
    "dtype", None,
    "import: parameter dtype (model.param_dtype; default: the checkpoint's config.json dtype, "
    "float32 when it names none); export: dtype of the safetensors (default float32).",
)
_COMPUTE_DTYPE = flags.DEFINE_string(
    "compute_dtype", None,
    "import: compute dtype (model.dtype; default: the parameter dtype, as transformers "
    "computes). --compute_dtype=bfloat16 computes in bfloat16 (faster on TPU; greedy outputs "
    "drift from transformers' after a few dozen tokens); same as --set=model.dtype=bfloat16.",
)
_SET = flags.DEFINE_multi_string(
    "set", [], "import: config override key=value (repeatable), e.g. model.dtype=bfloat16."
)
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest).")
_MAX_SHARD = flags.DEFINE_string(
    "max_shard_size", "5GB", "export: largest safetensors shard (bytes, or with KB/MB/GB)."
)

USAGE = "usage: python -m tessera.convert {import,export} --hf_dir=DIR --workdir=DIR"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as transformers' ``max_shard_size``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match or int(float(match.group(1)) * _UNITS[match.group(2)]) <= 0:
        raise ValueError(f"--max_shard_size={text!r} is not a size such as 5GB or 500MB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_pairs(items: list[str], what: str, prefix: str = "") -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: {item!r} is not key=value")
        out[prefix + key.strip()] = value.strip()
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        fail(USAGE)
    if not _HF_DIR.value or not _WORKDIR.value:
        fail(f"--hf_dir and --workdir are required ({USAGE})")
    from tessera.convert import export_hf, import_hf

    if argv[1] == "export" and _COMPUTE_DTYPE.value:
        fail("--compute_dtype is an import flag (export writes the parameters in --dtype)")
    if argv[1] == "import":
        overrides = parse_pairs([p for p in _MESH.value.split(",") if p], "--mesh", "mesh.")
        overrides.update(parse_pairs(_SET.value, "--set"))
        notes: list[str] = []
        config = import_hf(
            _HF_DIR.value, _WORKDIR.value, dtype=_DTYPE.value,
            compute_dtype=_COMPUTE_DTYPE.value, overrides=overrides, log=notes.append,
        )
        print(
            f"tessera: imported {config.model.family} from {_HF_DIR.value} into "
            f"{_WORKDIR.value} (checkpoint step 0, config {_WORKDIR.value}/config.py)"
        )
        for note in notes:
            print(f"tessera: {note}")
    else:
        step, files = export_hf(
            _WORKDIR.value,
            _HF_DIR.value,
            step=_STEP.value,
            dtype=_DTYPE.value or "float32",
            max_shard_bytes=parse_size(_MAX_SHARD.value),
        )
        print(
            f"tessera: exported step {step} of {_WORKDIR.value} to {_HF_DIR.value}: "
            f"{', '.join(files)}"
        )


if __name__ == "__main__":
    run_main(main)
