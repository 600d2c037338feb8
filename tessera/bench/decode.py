"""Decode throughput of a config's model (random weights): prefill and decode tokens/s at batch 1
and 16, the time of one decode step with 256 vs 2048 tokens already in the cache, the step time
at batch 16 with the same filled length in a 96- and a 1024-slot cache, and the cache's bytes
per token (all layers, with the slot's position; per-sequence state, e.g.
recurrent, is in the rows as ``cache_bytes_per_sequence``).

``python -m tessera.bench decode --config=llama:small [--contexts=256,8192] [--slots=96,1024]
[--config.a.b=v]``.
Compilation is ahead of time and not in the figures; each case runs once untimed first.
``--cache_only`` prints only the cache size
per token of each config, from abstract shapes (nothing allocated, so any preset size works:
``--config=deepseek:v3 --config=llama:70b``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tessera.bench.table import print_table
from tessera.configs import load_config
from tessera.kernels import cpu
from tessera.models.create import ModelSpec
from tessera.serve.engine import Decoder, single_device_mesh
from tessera.serve.outputs import DecodeStats
from tessera.serve.sampling import SamplingParams
from tessera.sharding import make_mesh, make_rules


def _random_prompts(rng: np.random.Generator, batch: int, length: int, vocab: int) -> list:
    return [[1, *rng.integers(3, vocab, length - 1).tolist()] for _ in range(batch)]


def _row(case: str, batch: int, context: int, stats: DecodeStats) -> dict:
    return {
        "case": case,
        "batch": batch,
        "context": context,
        "prefill_tok_s": stats.prefill_tokens / stats.prefill_s,
        "decode_tok_s": stats.decode_tokens / stats.decode_s,
        "ms_per_step": 1e3 * stats.decode_s / max(stats.decode_steps, 1),
        "compile_s": stats.compile_s,
        "cache_bytes_per_token": stats.cache.bytes_per_token,
        "cache_bytes_per_sequence": stats.cache.bytes_per_sequence,
    }


def run_decode_bench(
    config_spec: str,
    overrides: dict[str, Any] | None = None,
    *,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batches: Sequence[int] = (1, 16),
    contexts: Sequence[int] = (256, 2048),
    context_steps: int = 16,
    slots: Sequence[int] = (96, 1024),
    slots_batch: int = 16,
    slots_fill: int = 64,
    devices: Sequence[jax.Device] | None = None,
    cpu_kernels: Sequence[str] = ("on",),
) -> list[dict]:
    """Print the decode table for ``config_spec`` (+ dotted ``overrides``) and return its rows.

    Throughput rows: ``batch`` random prompts of ``prompt_len`` tokens, ``new_tokens`` each.
    Context rows (batch 1): a prompt of ``context`` tokens, then ``context_steps`` decode steps;
    ``ms_per_step`` is the per-token decode time at that context. Slot rows (batch
    ``slots_batch``): 32-token prompts and a token budget that allocates ``slots`` cache slots;
    ``ms_per_step`` is over the first ``slots_fill`` steps, so every row has the same filled
    length and only the allocated one differs (``vs_first_slots``: the ratio to the first).
    ``model.max_seq_len`` is raised if the longest context needs it (weights are random,
    positions are all that changes). ``cpu_kernels=("on", "off")`` runs each throughput and
    context case with tessera's CPU decode kernels (`tessera.kernels.cpu`) and then without
    them (compiled under ``disabled()``), side by side.
    """
    for setting in cpu_kernels:
        if setting not in ("on", "off"):
            raise ValueError(f"decode bench: cpu_kernels takes on / off, got {setting!r}")
    config = load_config(config_spec, overrides)
    need = max([*contexts, *slots, prompt_len]) + max(new_tokens, context_steps + 1)
    if config.model.max_seq_len < need:
        print(f"decode bench: model.max_seq_len raised {config.model.max_seq_len} -> {need}")
        config.model.max_seq_len = need
    mesh = make_mesh(config.mesh, devices)
    rules = make_rules(config.mesh.rules)
    spec = ModelSpec(config.model)
    params = spec.init(0, mesh, rules)
    decoder = Decoder(spec, params, mesh, rules)
    print(
        f"decode bench: {config_spec} ({spec.num_params() / 1e6:.1f}M params, "
        f"{config.model.dtype}) on {mesh.devices.size} {jax.devices()[0].platform} device(s), "
        f"mesh {dict((k, v) for k, v in mesh.shape.items() if v > 1) or '1 device'}",
        flush=True,
    )
    rng = np.random.default_rng(0)
    vocab = int(config.model.vocab_size)
    greedy = SamplingParams()
    rows = []

    decoders = {"on": decoder}
    if "off" in cpu_kernels:
        decoders["off"] = Decoder(spec, params, mesh, rules)

    def case(name: str, batch: int, length: int, steps: int) -> None:
        prompts = _random_prompts(rng, batch, length, vocab)
        for setting in cpu_kernels:
            stats = DecodeStats()
            with cpu.disabled() if setting == "off" else contextlib.nullcontext():
                run = decoders[setting].generate
                run(prompts, greedy, steps, stop_tokens=())  # compiles, first runs
                run(prompts, greedy, steps, stop_tokens=(), stats=stats)
            rows.append({**_row(name, batch, length, stats), "cpu_kernels": setting})

    for batch in batches:
        case(f"batch {batch}", batch, prompt_len, new_tokens)
    for context in contexts:
        case(f"context {context}", 1, context, context_steps + 1)
    first_slots = None
    for n in slots:
        stats = DecodeStats()
        prompts = _random_prompts(rng, slots_batch, 32, vocab)
        decoder.generate(prompts, greedy, n - 32, stop_tokens=(), stats=stats)
        row = _row(f"slots {stats.cache.slots}", slots_batch, 32, stats)
        steps = seconds = 0.0
        for k, sec, _ in stats.calls:
            if steps >= slots_fill:
                break
            steps, seconds = steps + k, seconds + sec
        row["ms_per_step"] = 1e3 * seconds / max(steps, 1)
        first_slots = first_slots or row["ms_per_step"]
        row["vs_first_slots"] = row["ms_per_step"] / first_slots
        rows.append(row)
    print_table(
        [{k: r.get(k, "") for k in ("case", "batch", "context", "cpu_kernels", "prefill_tok_s",
                                    "decode_tok_s", "ms_per_step", "vs_first_slots",
                                    "cache_bytes_per_token")}
         for r in rows],
        title=f"decode: {config_spec}",
    )
    return rows


def run_cache_table(
    config_specs: Sequence[str], overrides: dict[str, Any] | None = None, *, slots: int = 4096
) -> list[dict]:
    """Print each config's decode cache per token (all layers, in the model's dtype) and per
    sequence, next to the first config's, and return the rows. Abstract: no parameters or cache
    are allocated."""
    rows = []
    for config_spec in config_specs:
        config = load_config(config_spec, overrides)
        spec = ModelSpec(config.model)
        rules = make_rules(config.mesh.rules)
        info = Decoder(spec, None, single_device_mesh(), rules).cache_info(1, slots)
        rows.append({
            "config": config_spec,
            "params_B": spec.num_params() / 1e9,
            "layers": info.kinds,
            "dtype": str(config.model.dtype),
            "cache_bytes_per_token": info.bytes_per_token,
            "cache_bytes_per_sequence": info.bytes_per_sequence,
        })
    for row in rows:
        row["vs_first"] = row["cache_bytes_per_token"] / rows[0]["cache_bytes_per_token"]
    print_table(rows, title=f"decode cache per token ({slots} slots, batch 1)")
    return rows
