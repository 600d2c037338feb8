"""Recurrence impls side by side: ``python -m tessera.bench recurrence``.

One row per (op, sequence length, impl) for the linear-recurrence ops at the per-layer shapes of
1B-class models (`PROBLEMS`): Mamba-2's SSD, RetNet's retention and RWKV-6's WKV (both `gla`),
RWKV-7's delta rule and Mamba-1's selective scan. Every impl registered in the op's `Op` whose
``supports`` accepts the inputs and that auto may pick is run (nothing is named here, so kernels
registered later appear; the forms auto never picks, the O(T^2) ``parallel`` and the
O(T N) memory ``associative``, only with ``--impls``). The loss is the sum of the outputs and the
final state; the step is its value and gradient with respect to every float input.

- this machine: forward + backward wall time (median of ``repeats`` runs after a compile run)
  and the compiled program's temporary memory (``memory_analysis().temp_size_in_bytes``). The
  local table divides the head count (channels for the selective scan) by ``local_divisor`` so
  that 64k tokens fit a CPU host's memory and time; the title says the shapes.
- a TPU topology, compiled ahead of time with libtpu (``tessera.aot``), batch split over
  ``data`` (``batch`` per device): temporary memory per device of the program as it runs, and
  XLA's FLOPs and ``optimal_seconds``. XLA's cost counts a loop body once, so the cost comes from
  programs traced inside ``kernels.loops.unrolled()`` (the chunk scans unrolled) at two lengths
  (`COST_LENGTHS`, exact there), fitted as ``a + b T`` and read at each T: every impl's work is a
  fixed part plus the same work per chunk. Measured on v5p-8 (SSD, XLA chunked), the fit from
  T = 1024 and 2048 read at 4096 was 0.4% low in FLOPs and 8% low in ``optimal_seconds`` against
  an unrolled compile there (XLA's fusion choices vary with T); longer fit lengths cost unrolled
  compiles of hundreds of chunks (``cost_lengths``). A Pallas call counts what its
  ``CostEstimate`` says (XLA cannot see inside it otherwise).

``vs chunked`` is the impl's time over the XLA ``chunked`` form's at the same length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tessera.bench.kernels import median_ms, tpu_mesh, xla_cost
from tessera.bench.table import print_table
from tessera.kernels import loops
from tessera.kernels.registry import KernelUnavailableError, Op

MiB = 1024**2
GiB = 1024**3
F32 = jnp.float32
REFERENCE = "chunked"  # the XLA form every row is compared with
COST_LENGTHS = (1024, 2048)  # the unrolled compiles the TPU cost is fitted on
RWKV7_HEAD = 64  # RWKV-7 1.5B: 32 heads of 64


@dataclasses.dataclass(frozen=True)
class Problem:
    """One op at one model's per-layer shapes. ``inputs(batch, T, divisor)`` gives the array
    arguments as shape structs (heads / channels divided by ``divisor``), ``call(impl, *arrays)``
    runs the op and returns (output, final state)."""

    name: str
    model: str
    op: Op
    inputs: Callable[[int, int, int], tuple[jax.ShapeDtypeStruct, ...]]
    call: Callable[..., tuple[jax.Array, jax.Array]]
    dims: Callable[[int], str]


def _sds(*shape: int, dtype: Any = F32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _heads(x: jax.Array, width: int) -> jax.Array:
    """[B, T, H * width] -> [B, T, H, width]: per-head arrays arrive as the model's projections
    make them (a reshape inside the program, as in the mixers), not as [B, T, H, D] arguments
    whose TPU layout would need a copy."""
    return x.reshape(*x.shape[:2], -1, width)


def _ssd_problem() -> Problem:
    from tessera.kernels import ssd

    heads, p, n = 64, 64, 128

    def inputs(b: int, t: int, d: int) -> tuple:
        h = max(1, heads // d)
        return (_sds(b, t, h * p), _sds(b, t, h), _sds(h), _sds(b, t, n), _sds(b, t, n), _sds(h))

    def call(impl: str, x, dt, A, B, C, D):
        return ssd.ssd(_heads(x, p), dt, A, _heads(B, n), _heads(C, n), D, impl=impl)

    return Problem("ssd", "Mamba-2 1.3B", ssd.OP, inputs, call,
                   lambda d: f"H={max(1, heads // d)} P={p} N={n} G=1")


def _gla_problem(name: str, model: str, heads: int, dk: int, dv: int, per_channel: bool
                 ) -> Problem:
    from tessera.kernels import gla

    def inputs(b: int, t: int, d: int) -> tuple:
        h = max(1, heads // d)
        g = _sds(b, t, h * dk) if per_channel else _sds(b, t, h)
        extra = (_sds(h, dk),) if per_channel else ()
        return (_sds(b, t, h * dk), _sds(b, t, h * dk), _sds(b, t, h * dv), g, *extra)

    def call(impl: str, q, k, v, g, u=None):
        g = _heads(g, dk) if per_channel else g
        return gla.gla(_heads(q, dk), _heads(k, dk), _heads(v, dv), g, u=u, scale=dk**-0.5,
                       impl=impl)

    decay = "per-channel decay, bonus u" if per_channel else "scalar decay"
    return Problem(name, model, gla.OP, inputs, call,
                   lambda d: f"H={max(1, heads // d)} K={dk} V={dv} {decay}")


def _delta_problem() -> Problem:
    from tessera.kernels import delta_rule

    heads, dk = 32, RWKV7_HEAD

    def inputs(b: int, t: int, d: int) -> tuple:
        h = max(1, heads // d)
        return tuple(_sds(b, t, h * dk) for _ in range(6))

    return Problem("delta_rule", "RWKV-7 1.5B", delta_rule.OP, inputs,
                   lambda impl, *a: delta_rule.delta_rule(*(_heads(x, dk) for x in a),
                                                          impl=impl),
                   lambda d: f"H={max(1, heads // d)} K=V={dk}")


def _scan_problem() -> Problem:
    from tessera.kernels import selective_scan

    channels, n = 4096, 16

    def inputs(b: int, t: int, d: int) -> tuple:
        di = max(1, channels // d)
        return (_sds(b, t, di), _sds(b, t, di), _sds(di, n), _sds(b, t, n), _sds(b, t, n),
                _sds(di))

    return Problem("selective_scan", "Mamba-1.4B", selective_scan.OP, inputs,
                   lambda impl, *a: selective_scan.selective_scan(*a, impl=impl),
                   lambda d: f"Di={max(1, channels // d)} N={n}")


def problems() -> dict[str, Problem]:
    """The benchmarked ops by name, in table order."""
    return {p.name: p for p in (
        _ssd_problem(),
        _gla_problem("retention", "RetNet 1.3B", 8, 256, 512, per_channel=False),
        _gla_problem("rwkv6", "RWKV-6 1.6B", 32, 64, 64, per_channel=True),
        _delta_problem(),
        _scan_problem(),
    )}


def realistic(problem: Problem, shapes: Sequence[jax.ShapeDtypeStruct], seed: int = 0
              ) -> tuple[jax.Array, ...]:
    """Random arrays of ``shapes`` in each op's typical ranges (decays in (0, 1), dt in ~(0, 1),
    A < 0, RWKV-7's unit-norm removal key with a = -kk, b = kk * iclr)."""
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    normal = [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, shapes)]
    if problem.name in ("retention", "rwkv6"):
        q, k, v, g, *u = normal
        return (q, k, v, -jnp.exp(g - 1.0), *u)
    if problem.name == "delta_rule":
        r, w, k, v, kk, iclr = normal
        kk = _heads(kk, RWKV7_HEAD)
        kk = (kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)).reshape(w.shape)
        w = -jnp.exp(-0.5) * jax.nn.sigmoid(w)
        return r, w, k, v, -kk, kk * jax.nn.sigmoid(iclr)
    x, dt, a, b, c, d = normal  # ssd, selective_scan
    return x, jax.nn.softplus(dt - 1.0), -jnp.exp(0.5 * a), b, c, d


def train_step(problem: Problem, impl: str) -> Callable[..., Any]:
    """(*arrays) -> gradients of sum(output) + sum(final state) wrt every array."""

    def loss(*arrays: jax.Array) -> jax.Array:
        out, state = problem.call(impl, *arrays)
        return jnp.sum(out.astype(F32)) + jnp.sum(state)

    def step(*arrays: jax.Array) -> Any:
        return jax.grad(loss, argnums=tuple(range(len(arrays))))(*arrays)

    return step


def runnable_impls(problem: Problem, shapes: Sequence[jax.ShapeDtypeStruct],
                   named: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The impls (in OP order) that accept these inputs on the target platform and that auto
    may pick for some input (plus ``named``), and why the others are not run."""
    ok: list[str] = []
    declined: dict[str, str] = {}
    for name in problem.op.names:
        chosen = problem.op.impl(name)
        if chosen.name != name:
            continue  # an alias (ssd's "xla" is "chunked")
        if chosen.auto is False and name not in named:
            declined[name] = "only when named (--impls)"
            continue
        try:  # the public function's own selection, on shapes only
            jax.eval_shape(functools.partial(problem.call, name), *shapes)
        except KernelUnavailableError as e:
            declined[name] = str(e).split("cannot run these inputs: ", 1)[-1]
            continue
        ok.append(name)
    return ok, declined


def _split_batch(shapes: Sequence[jax.ShapeDtypeStruct], batch: int, sharding: Any
                 ) -> list[jax.ShapeDtypeStruct]:
    """``shapes`` with ``sharding`` on the per-token arrays ([batch, T, ...]); the parameters
    (A, D, u) stay replicated."""
    return [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding
                                 if len(s.shape) >= 3 and s.shape[0] == batch else None)
            for s in shapes]


def _ratio(rows: list[dict], key: str) -> None:
    """Fill ``vs chunked`` with each row's ``key`` over the chunked row's at the same (op, T)."""
    base = {(r["op"], r["T"]): r[key] for r in rows if r["impl"] == REFERENCE}
    for r in rows:
        ref = base.get((r["op"], r["T"]))
        ok = isinstance(r[key], float) and isinstance(ref, float) and ref > 0
        r["vs chunked"] = f"{r[key] / ref:.2f}x" if ok else "-"


def measure_local(names: Sequence[str], lengths: Sequence[int], *, batch: int = 1,
                  divisor: int = 8, repeats: int = 3, named: Sequence[str] = (),
                  progress: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Time and temp memory of every runnable impl here, one row per (op, T, impl); also the
    impls declined, per op, at the first length with their reasons."""
    rows: list[dict] = []
    declined: dict[str, dict[str, str]] = {}
    table = problems()
    for name in names:
        problem = table[name]
        for i, length in enumerate(lengths):
            shapes = problem.inputs(batch, length, divisor)
            impls, why = runnable_impls(problem, shapes, named)
            if i == 0:
                declined[name] = why
            args = realistic(problem, shapes)
            for impl in impls:
                progress(f"  {name} T={length} {impl} ...")
                compiled = jax.jit(train_step(problem, impl)).lower(*args).compile()
                rows.append({
                    "op": name, "T": length, "impl": impl,
                    "fwd+bwd (ms)": median_ms(compiled, args, repeats),
                    "temp (MiB)": compiled.memory_analysis().temp_size_in_bytes / MiB,
                })
    _ratio(rows, "fwd+bwd (ms)")
    return rows, declined


def affine_cost(problem: Problem, impl: str, shapes_at: Callable[[int], list],
                lengths: Sequence[int] = COST_LENGTHS) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of FLOPs and of optimal_seconds as ``a + b * T``, from compiles of the step with
    kernel loops unrolled at the two ``lengths``."""
    points = []
    for length in lengths:
        with loops.unrolled():  # a new trace: jit would reuse a rolled one
            compiled = jax.jit(train_step(problem, impl)).lower(*shapes_at(length)).compile()
        points.append(xla_cost(compiled))
    (f1, s1), (f2, s2) = points
    t1, t2 = lengths
    slope = np.array([(f2 - f1) / (t2 - t1), (s2 - s1) / (t2 - t1)])
    return np.array([f1, s1]) - slope * t1, slope


def _temp_or_oom(problem: Problem, impl: str, shapes: Sequence) -> float | str:
    """The step's temp MiB per device, or why it does not compile: XLA refuses a program whose
    temporaries exceed the chip's HBM ("RESOURCE_EXHAUSTED ... CompileTimeHbmOom")."""
    from tessera.aot.compile import does_not_fit

    try:
        compiled = jax.jit(train_step(problem, impl)).lower(*shapes).compile()
    except jax.errors.JaxRuntimeError as e:
        oom = does_not_fit(f"{problem.name} {impl}", e)
        if oom is None:
            raise
        return "over HBM" if oom.needed is None else f"over HBM ({oom.needed / GiB:.4g} GiB temp)"
    return compiled.memory_analysis().temp_size_in_bytes / MiB


def measure_tpu(names: Sequence[str], lengths: Sequence[int], topology: str, *, batch: int = 4,
                named: Sequence[str] = (), divisor: int = 1,
                cost_lengths: Sequence[int] = COST_LENGTHS,
                progress: Callable[[str], None] = print) -> tuple[list[dict], dict, str]:
    """Per-device temp memory, FLOPs and optimal_seconds (affine fit on ``cost_lengths``, see
    the module docstring) of every impl that accepts the inputs on ``topology`` (AOT, nothing
    runs); heads / channels divided by ``divisor`` (1: the models' shapes)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from tessera.aot.compile import make_target
    from tessera.aot.topology import parse_topology
    from tessera.sharding.context import use_mesh

    target = make_target(parse_topology(topology))
    mesh = tpu_mesh(target.devices)
    n = len(target.devices)
    split = NamedSharding(mesh, PartitionSpec("data"))
    rows: list[dict] = []
    declined: dict[str, dict[str, str]] = {}
    table = problems()
    with use_mesh(mesh):
        for name in names:
            problem = table[name]

            def shapes_at(length: int, problem: Problem = problem) -> list:
                return _split_batch(problem.inputs(batch * n, length, divisor), batch * n, split)

            impls, declined[name] = runnable_impls(problem, shapes_at(lengths[0]), named)
            for impl in impls:
                if impl == "sequential":  # one scan step per token: not a training path
                    declined[name][impl] = "a token-by-token scan (the decode step)"
                    continue
                progress(f"  {name} {impl}: cost fit ...")
                a, b = affine_cost(problem, impl, shapes_at, cost_lengths)
                for length in lengths:
                    progress(f"  {name} T={length} {impl} ...")
                    flops, seconds = a + b * length
                    rows.append({
                        "op": name, "T": length, "impl": impl,
                        "temp (MiB)": _temp_or_oom(problem, impl, shapes_at(length)),
                        "GFLOP": float(flops) / 1e9,
                        "optimal (ms)": 1e3 * float(seconds) if seconds > 0 else "n/a",
                    })
    _ratio(rows, "optimal (ms)")
    return rows, declined, f"{target.topology.name}, {n} devices"


def _footer(declined: dict[str, dict[str, str]]) -> None:
    for op, why in declined.items():
        for name, reason in why.items():
            print(f"  not run: {op} {name}: {reason}")


def run_recurrence_bench(names: Sequence[str], lengths: Sequence[int], *, batch: int = 1,
                         divisor: int = 8, repeats: int = 3, tpu: str | None = None,
                         tpu_lengths: Sequence[int] | None = None, tpu_batch: int = 4,
                         named: Sequence[str] = (), local: bool = True
                         ) -> dict[str, list[dict]]:
    """Print the local table and, with ``tpu`` (a topology name), the AOT TPU table."""
    table = problems()
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown recurrence op(s) {unknown}; valid: {', '.join(table)}")
    out: dict[str, list[dict]] = {}

    def progress(line: str) -> None:
        print(line, flush=True)

    if local:
        device = jax.devices()[0]
        rows, declined = measure_local(names, lengths, batch=batch, divisor=divisor,
                                       repeats=repeats, named=named, progress=progress)
        shapes = "; ".join(f"{n}: {table[n].model} / {divisor}, {table[n].dims(divisor)}"
                           for n in names)
        print_table(rows, title=f"recurrence fwd+bwd on {len(jax.devices())}x "
                                f"{device.device_kind} ({device.platform}), B={batch}, median of "
                                f"{repeats} ({shapes})")
        _footer(declined)
        out["local"] = rows
    if tpu:
        rows, declined, target = measure_tpu(names, tpu_lengths or lengths, tpu,
                                             batch=tpu_batch, named=named, progress=progress)
        shapes = "; ".join(f"{n}: {table[n].model}, {table[n].dims(1)}" for n in names)
        print()
        print_table(rows, title=f"recurrence fwd+bwd AOT-compiled for {target}, B={tpu_batch} "
                                f"per device ({shapes})")
        _footer(declined)
        print(f"  GFLOP / optimal (ms): XLA's cost model per device, fitted as a + b T on "
              f"unrolled compiles at T = {COST_LENGTHS[0]} and {COST_LENGTHS[1]}; temp: the "
              f"program as it runs.")
        out["tpu"] = rows
    return out
