"""Decode speed of tessera next to Hugging Face transformers ``generate``, on the same random
weights and prompts: ``python -m tessera.bench decode --against=hf``.

transformers runs in a side virtualenv (torch is no dependency of tessera), in a worker process
(``tools/hf_decode_worker.py``) driven over JSON lines; tessera runs in this process. For each
model the worker builds a random float32 transformers model of the bench shape and saves it;
tessera imports that directory (``tessera.convert.import_hf``, computing in float32) and decodes
with ``tessera.serve.engine.Decoder``. Per batch size, each side runs once to warm up (tessera
compiles ahead of time here; compile time is never in the figures), then ``repeats`` times
alternately, HF first.

Both sides' times include prefill (HF's ``generate`` does): tokens/s is new tokens / (prefill +
decode seconds); greedy tokens are compared row by row. The roofline columns divide the bytes a
decode step reads (``tessera.bench.memory.decode_step_bytes``) x steps/s by the host's copy
bandwidth (``copy_bandwidth``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from tessera.bench.memory import StepBytes, copy_bandwidth, decode_step_bytes
from tessera.bench.table import print_table
from tessera.serve.engine import Decoder
from tessera.serve.outputs import DecodeStats
from tessera.serve.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tools", "hf_decode_worker.py")
HF_PYTHON = "/tmp/hfvenv/bin/python"
HF_SETUP = (
    "PYENV_VERSION=3.11.7 python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install "
    "torch==2.13.0 transformers==5.23.0 safetensors numpy"
)
VOCAB = 272  # as tools/make_golden.py


@dataclasses.dataclass(frozen=True)
class HFModel:
    """A transformers model class and its config (``model_type`` included), as config.json."""

    model_class: str
    config: Mapping[str, Any]


_TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=None, pad_token_id=0,
               tie_word_embeddings=False)

# The bench shapes: llama is tessera's llama:small; Mamba-2 is 14M parameters of 8 layers of
# width 512 (16 heads of 64), state 128, one B/C group (the published mamba2 layout).
BENCH_MODELS: dict[str, HFModel] = {
    "llama": HFModel("LlamaForCausalLM", dict(
        _TOKENS, model_type="llama", hidden_size=512, intermediate_size=1536,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        max_position_embeddings=1024, rms_norm_eps=1e-5, hidden_act="silu",
    )),
    "mamba2": HFModel("Mamba2ForCausalLM", dict(
        _TOKENS, model_type="mamba2", hidden_size=512, num_hidden_layers=8, state_size=128,
        expand=2, head_dim=64, num_heads=16, n_groups=1, chunk_size=256, conv_kernel=4,
        layer_norm_epsilon=1e-5, hidden_act="silu",
    )),
}


def check_hf_python(path: str) -> None:
    """FileNotFoundError naming the setup commands when ``path`` is no interpreter."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise FileNotFoundError(
            f"--hf_python {path} does not exist: the HF side needs a virtualenv with torch and "
            f"transformers, e.g. {HF_SETUP} (or pass --hf_python=PATH to its python)"
        )


class HFWorker:
    """The worker process (``python worker``), one JSON request / reply per line."""

    def __init__(self, python: str, worker: str = WORKER):
        check_hf_python(python)
        if not os.path.isfile(worker):
            raise FileNotFoundError(f"HF worker script {worker} does not exist")
        self.proc = subprocess.Popen(
            [python, worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def request(self, op: str, **kwargs: Any) -> dict:
        """Send one request; its reply, or RuntimeError with the worker's error."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # reported below, with the exit status
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"HF worker exited (status {self.proc.wait()}) during {op!r}; its stderr is above"
            )
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"HF worker, {op}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("quit")
                self.proc.wait(timeout=30)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> HFWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IdTokenizer:
    """Token ids only (the bench's prompts are ids): every id of the model's vocabulary decodes,
    to no text. The random models' vocabulary (272) is larger than the byte tokenizer's."""

    def __init__(self, vocab_size: int):
        self._vocab_size = vocab_size

    pad_id = property(lambda self: 0)
    bos_id = property(lambda self: 1)
    eos_id = property(lambda self: 2)
    vocab_size = property(lambda self: self._vocab_size)

    def encode(self, text: str) -> list[int]:
        raise ValueError("the decode bench takes token ids, not text")

    def decode(self, ids: Iterable[int]) -> str:
        return ""


def tessera_decoder(
    hf_dir: str, workdir: str, devices: Sequence[jax.Device] | None = None
) -> Decoder:
    """Import ``hf_dir`` into ``workdir`` (computing in float32) and load it for decoding on
    ``devices`` (default: all) with an ids-only tokenizer."""
    from tessera.convert import import_hf
    from tessera.serve.loading import load_decoder

    config = import_hf(hf_dir, workdir, overrides={"model.dtype": "float32"}, devices=devices)
    tokenizer = IdTokenizer(int(config.model.vocab_size))
    return load_decoder(config, workdir, devices=devices, tokenizer=tokenizer)[0]


def compare_tokens(
    a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]
) -> tuple[int, int | None]:
    """(rows that differ, first differing position over all rows, or None)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} rows vs {len(b)}")
    rows, first = 0, None
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        diff = [i for i in range(n) if x[i] != y[i]] or ([n] if len(x) != len(y) else [])
        if diff:
            rows += 1
            first = diff[0] if first is None else min(first, diff[0])
    return rows, first


def _tessera_run(decoder: Decoder, prompts: list, new_tokens: int) -> tuple[list, DecodeStats]:
    stats = DecodeStats()
    out = decoder.generate(prompts, SamplingParams(), new_tokens, stop_tokens=(), stats=stats)
    return [c.tokens for c in out], stats


def run_against_hf(
    models: Sequence[str] = ("llama", "mamba2"),
    *,
    batches: Sequence[int] = (1, 16),
    prompt_len: int = 32,
    new_tokens: int = 256,
    repeats: int = 3,
    hf_python: str = HF_PYTHON,
    worker: str = WORKER,
    shapes: Mapping[str, HFModel] = BENCH_MODELS,
    seed: int = 0,
    probe_bytes: int = 512 * 2**20,
    devices: Sequence[jax.Device] | None = None,
) -> list[dict]:
    """Print the tessera-vs-transformers decode table and return its rows (one per model and
    batch; the printed columns plus the raw timings and the step's byte count).

    ``worker`` speaks the protocol of tools/hf_decode_worker.py, run by ``hf_python``;
    ``shapes`` names the models; ``probe_bytes`` sizes the bandwidth probe's buffer; tessera
    decodes on ``devices`` (default: all)."""
    unknown = [m for m in models if m not in shapes]
    if unknown or not models:
        raise ValueError(f"unknown models {unknown or models}; known: {sorted(shapes)}")
    if min(batches, default=0) < 1 or prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError(
            f"batches ({list(batches)}), prompt_len ({prompt_len}), new_tokens ({new_tokens}) "
            f"and repeats ({repeats}) must be >= 1"
        )
    check_hf_python(hf_python)
    bandwidth = copy_bandwidth(probe_bytes)
    print(f"decode vs transformers: host copy bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(read + write, {probe_bytes / 2**20:.0f} MiB buffer)", flush=True)
    rows = []
    with HFWorker(hf_python, worker) as hf, tempfile.TemporaryDirectory() as tmp:
        for name in models:
            shape = shapes[name]
            hf_dir, workdir = os.path.join(tmp, name, "hf"), os.path.join(tmp, name, "work")
            built = hf.request("build", model_class=shape.model_class, config=dict(shape.config),
                               seed=seed, dir=hf_dir)
            decoder = tessera_decoder(hf_dir, workdir, devices)
            print(
                f"{name}: {decoder.spec.num_params() / 1e6:.2f}M params "
                f"(transformers {built['params'] / 1e6:.2f}M), float32; transformers "
                f"{built.get('transformers')} torch {built.get('torch')} with "
                f"{built['threads']} threads, "
                f"attn_implementation={built.get('attn_implementation')}",
                flush=True,
            )
            rng = np.random.default_rng(seed)
            vocab = int(shape.config["vocab_size"])
            for batch in batches:
                prompts = rng.integers(3, vocab, (batch, prompt_len)).tolist()
                row = _case(hf, decoder, name, prompts, new_tokens, repeats, bandwidth)
                row["hf_threads"] = built["threads"]
                rows.append(row)
                print(f"{name} batch {batch}: transformers {row['hf_tok_s']:.1f} tok/s, tessera "
                      f"{row['tessera_tok_s']:.1f} tok/s, {row['mismatched_rows']} rows differ",
                      flush=True)
    print_table(
        [{k: r[k] for k in ("model", "batch", "hf_tok_s", "tessera_tok_s", "tessera_vs_hf",
                            "mismatched_rows", "first_mismatch", "MB_per_step", "hf_GB_s",
                            "tessera_GB_s", "hf_of_copy", "tessera_of_copy")} for r in rows],
        title=f"decode vs transformers: {prompt_len}-token prompts + {new_tokens} new tokens, "
              f"greedy, float32, prefill included, median of {repeats}",
    )
    return rows


def _case(
    hf: HFWorker, decoder: Decoder, name: str, prompts: list, new_tokens: int, repeats: int,
    bandwidth: float,
) -> dict:
    """One (model, batch) row: warm-up, then ``repeats`` alternating runs."""
    batch, prompt_len = len(prompts), len(prompts[0])
    hf.request("generate", prompts=prompts, max_new_tokens=min(new_tokens, 16))
    _, warm = _tessera_run(decoder, prompts, new_tokens)
    hf_s, tes_s, prefill_s, mismatched, first = [], [], [], 0, None
    for _ in range(repeats):
        got = hf.request("generate", prompts=prompts, max_new_tokens=new_tokens)
        tokens, stats = _tessera_run(decoder, prompts, new_tokens)
        if any(len(t) != new_tokens for t in [*tokens, *got["tokens"]]):
            raise RuntimeError(f"{name}: a side made other than {new_tokens} tokens per row")
        hf_s.append(float(got["seconds"]))
        tes_s.append(stats.prefill_s + stats.decode_s)
        prefill_s.append(stats.prefill_s)
        rows, at = compare_tokens(tokens, got["tokens"])
        mismatched = max(mismatched, rows)
        first = at if first is None else (first if at is None else min(first, at))
    step: StepBytes = decode_step_bytes(decoder, batch, prompt_len, new_tokens)
    hf_tok = batch * new_tokens / statistics.median(hf_s)
    tes_tok = batch * new_tokens / statistics.median(tes_s)
    gbs = lambda tok_s: step.total * tok_s / batch / 1e9  # bytes/step x steps/s
    return {
        "model": name,
        "batch": batch,
        "hf_tok_s": hf_tok,
        "tessera_tok_s": tes_tok,
        "tessera_vs_hf": tes_tok / hf_tok,
        "mismatched_rows": f"{mismatched}/{batch}",
        "first_mismatch": "-" if first is None else first,
        "MB_per_step": step.total / 1e6,
        "hf_GB_s": gbs(hf_tok),
        "tessera_GB_s": gbs(tes_tok),
        "hf_of_copy": gbs(hf_tok) * 1e9 / bandwidth,
        "tessera_of_copy": gbs(tes_tok) * 1e9 / bandwidth,
        "mismatches": mismatched,
        "hf_seconds": hf_s,
        "tessera_seconds": tes_s,
        "tessera_prefill_seconds": prefill_s,
        "tessera_compile_s": warm.compile_s,
        "step_bytes": dataclasses.asdict(step),
        "copy_bandwidth": bandwidth,
    }
