"""Attention impls side by side: ``python -m tessera.bench attention``.

Every impl registered in ``tessera.kernels.attention.OP`` whose ``supports`` accepts the inputs
is benchmarked (nothing is named here, so kernels registered later appear), on causal or
bidirectional index-aligned self attention (``index_aligned=True``: a training step's attention)
with a sum-of-outputs loss:

- this machine: forward + backward wall time (median of ``repeats`` runs after a compile run)
  and the compiled program's temporary memory (``memory_analysis().temp_size_in_bytes``: the
  scores, softmax residuals and tile buffers, on top of inputs and outputs).
- a TPU topology, compiled ahead of time with libtpu (``tessera.aot``) on a mesh of its devices
  with the batch split over ``data`` (``--batch`` per device): temporary memory per device and
  XLA's FLOPs and ``optimal_seconds``. XLA's cost counts a loop's body once, so up to
  ``cost_max_length`` the cost program is traced inside ``kernels.loops.unrolled()`` (xla_chunked's
  tile loops unrolled; its compile time grows with the tile count); the memory comes from the
  program as it runs. XLA cannot see inside a Pallas call unless it carries a cost estimate.

The plain ``xla`` impl builds [B, H, T, T] float32 scores: past ``max_scores_gib`` it is skipped
with the size it would need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tessera.bench.kernels import median_ms, tpu_mesh, xla_cost
from tessera.bench.table import print_table
from tessera.kernels import loops
from tessera.kernels.attention import OP, attention
from tessera.kernels.registry import KernelUnavailableError

GiB = 1024**3
MiB = 1024**2


@dataclasses.dataclass(frozen=True)
class Problem:
    """One attention call's sizes (q [B, T, H, D], k / v [B, T, Hkv, D])."""

    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    causal: bool = True

    def shapes(self, length: int, batch: int | None = None) -> tuple[jax.ShapeDtypeStruct, ...]:
        """q, k, v, positions as shape structs for T = ``length``."""
        b = self.batch if batch is None else batch
        dt = jnp.dtype(self.dtype)
        return (
            jax.ShapeDtypeStruct((b, length, self.heads, self.head_dim), dt),
            jax.ShapeDtypeStruct((b, length, self.kv_heads, self.head_dim), dt),
            jax.ShapeDtypeStruct((b, length, self.kv_heads, self.head_dim), dt),
            jax.ShapeDtypeStruct((b, length), jnp.int32),
        )

    def scores_bytes(self, length: int) -> int:
        """Bytes of the plain path's float32 [B, H, T, T] scores."""
        return self.batch * self.heads * length * length * 4


def _call_kwargs(problem: Problem, positions: Any) -> dict:
    return dict(q_positions=positions, kv_positions=positions, causal=problem.causal,
                index_aligned=True)


def runnable_impls(problem: Problem, length: int, batch: int | None = None
                   ) -> tuple[list[str], dict[str, str]]:
    """Registered impls that accept the inputs here (in OP's order), and why the others do not.
    Reads the target platform: call under ``use_mesh`` for another platform's view."""
    q, k, v, pos = problem.shapes(length, batch)
    ok: list[str] = []
    declined: dict[str, str] = {}
    for name in OP.names:
        try:
            OP.select(name, q, k, v, **_call_kwargs(problem, pos))
        except KernelUnavailableError as e:
            declined[name] = str(e).split("cannot run these inputs: ", 1)[-1]
        else:
            ok.append(name)
    return ok, declined


def train_step(problem: Problem, impl: str) -> Callable[..., Any]:
    """(q, k, v, positions) -> (dq, dk, dv) of sum(attention(...)): forward and backward."""

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array) -> jax.Array:
        out = attention(q, k, v, **_call_kwargs(problem, pos), impl=impl)
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def _skip_reason(problem: Problem, impl: str, length: int, max_scores_gib: float) -> str | None:
    scores = problem.scores_bytes(length)
    if impl == "xla" and scores > max_scores_gib * GiB:
        return f"skipped (T*T scores {scores / GiB:.3g} GiB)"
    return None


def _random_inputs(problem: Problem, length: int) -> tuple[jax.Array, ...]:
    q, k, v, pos = problem.shapes(length)
    keys = jax.random.split(jax.random.key(0), 3)
    arrays = [jax.random.normal(key, s.shape, s.dtype) for key, s in zip(keys, (q, k, v))]
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), pos.shape)
    return (*arrays, positions)


def measure_local(problem: Problem, lengths: Sequence[int], repeats: int = 3,
                  max_scores_gib: float = 2.0) -> tuple[list[dict], dict[str, str]]:
    """Time and temp memory of every impl runnable on this machine, one row per (T, impl);
    also returns the impls declined at the first length, with their reasons."""
    rows: list[dict] = []
    declined_first: dict[str, str] = {}
    for i, length in enumerate(lengths):
        impls, declined = runnable_impls(problem, length)
        if i == 0:
            declined_first = declined
        args = None
        for impl in impls:
            row = {"T": length, "impl": impl, "fwd+bwd (ms)": "", "temp (MiB)": ""}
            rows.append(row)
            skip = _skip_reason(problem, impl, length, max_scores_gib)
            if skip is not None:
                row["fwd+bwd (ms)"], row["temp (MiB)"] = skip, "-"
                continue
            args = _random_inputs(problem, length) if args is None else args
            compiled = jax.jit(train_step(problem, impl)).lower(*args).compile()
            row["temp (MiB)"] = compiled.memory_analysis().temp_size_in_bytes / MiB
            row["fwd+bwd (ms)"] = median_ms(compiled, args, repeats)
    return rows, declined_first


def measure_tpu(problem: Problem, lengths: Sequence[int], topology: str,
                max_scores_gib: float = 2.0, cost_max_length: int = 4096
                ) -> tuple[list[dict], dict[str, str], str]:
    """Per-device temp memory and XLA's FLOPs and optimal_seconds of every impl that accepts the
    inputs on ``topology`` (AOT, nothing runs); also the declined impls and the target's name.

    Up to ``cost_max_length`` the cost comes from a second program with the kernel loops
    unrolled (cost "unrolled"); above it (unrolled compiles grow with the tile count) from the
    program as it runs, whose loop bodies XLA counts once (cost "loops once": a lower bound)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from tessera.aot.compile import make_target
    from tessera.aot.topology import parse_topology
    from tessera.sharding.context import use_mesh

    target = make_target(parse_topology(topology))
    mesh = tpu_mesh(target.devices)
    n = len(target.devices)
    split = NamedSharding(mesh, PartitionSpec("data"))
    rows: list[dict] = []
    declined_first: dict[str, str] = {}
    with use_mesh(mesh):
        for i, length in enumerate(lengths):
            shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=split)
                      for s in problem.shapes(length, problem.batch * n)]
            impls, declined = runnable_impls(problem, length, problem.batch * n)
            if i == 0:
                declined_first = declined
            for impl in impls:
                row = {"T": length, "impl": impl, "temp (MiB)": "", "GFLOP": "",
                       "optimal (ms)": "", "cost": ""}
                rows.append(row)
                skip = _skip_reason(problem, impl, length, max_scores_gib)
                if skip is not None:
                    row.update({"temp (MiB)": skip, "GFLOP": "-", "optimal (ms)": "-"})
                    continue
                costed = compiled = jax.jit(train_step(problem, impl)).lower(*shapes).compile()
                row["temp (MiB)"] = compiled.memory_analysis().temp_size_in_bytes / MiB
                row["cost"] = "loops once"
                if length <= cost_max_length:
                    with loops.unrolled():  # a new function: jit would reuse the rolled trace
                        costed = jax.jit(train_step(problem, impl)).lower(*shapes).compile()
                    row["cost"] = "unrolled"
                flops, seconds = xla_cost(costed)
                row["GFLOP"] = flops / 1e9
                # XLA's TPU cost model can return a negative time (seen: xla_chunked, v5e, T=4096).
                row["optimal (ms)"] = (
                    1e3 * seconds if seconds >= 0 else f"n/a (XLA: {seconds:.3g} s)")
    return rows, declined_first, f"{target.topology.name}, {n} devices"


def _footer(declined: dict[str, str]) -> None:
    for name, reason in declined.items():
        print(f"  not run: {name}: {reason}")


def run_attention_bench(problem: Problem, lengths: Sequence[int], *, repeats: int = 3,
                        tpu: str | None = None, tpu_lengths: Sequence[int] | None = None,
                        max_scores_gib: float = 2.0, cost_max_length: int = 4096
                        ) -> dict[str, list[dict]]:
    """Print the local table and, with ``tpu`` (a topology name), the AOT TPU table."""
    what = (f"B={problem.batch} H={problem.heads} Hkv={problem.kv_heads} D={problem.head_dim} "
            f"{problem.dtype} {'causal' if problem.causal else 'bidirectional'}")
    device = jax.devices()[0]
    local, declined = measure_local(problem, lengths, repeats, max_scores_gib)
    print_table(local, title=f"attention fwd+bwd on {len(jax.devices())}x {device.device_kind} "
                             f"({device.platform}), {what}, median of {repeats}")
    _footer(declined)
    out = {"local": local}
    if tpu:
        rows, declined, name = measure_tpu(problem, tpu_lengths or lengths, tpu, max_scores_gib,
                                           cost_max_length)
        print()
        print_table(rows, title=f"attention fwd+bwd AOT-compiled for {name}, {what} per device")
        _footer(declined)
        print("  GFLOP / optimal (ms): XLA's cost model per device; 'unrolled': kernel loops "
              "unrolled for costing, 'loops once': each loop body counted once (a lower bound).")
        print("  XLA cannot see inside a Pallas call unless it carries a cost estimate.")
        out["tpu"] = rows
    return out
