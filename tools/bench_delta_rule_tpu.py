"""AOT figures for the delta_rule Pallas TPU kernel vs the XLA chunked form (no TPU needed).

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python tools/bench_delta_rule_tpu.py \\
        [--topology v5p-8] [--batch 4] [--lengths 4096 16384] [--dtype bfloat16] \\
        [--chunks 16 32] [--flat]

Compiles jit(value_and_grad(sum of o and final state)) of ``delta_rule`` at RWKV-7 1.5B's
mixer shape (32 heads of 64, tessera/configs/rwkv7.py), ``--batch`` rows per chip, data
parallel over every chip of the topology, and prints one chip's program figures:
``memory_analysis().temp_size_in_bytes`` and ``cost_analysis()`` optimal_seconds / flops.

XLA's cost analysis counts a while loop's body once. The kernel's program has no loop (the
pallas_calls carry `pl.CostEstimate`s for their whole grids). The chunked form's chunk pass is a
`loops.scan`: its row ``chunked (unrolled)`` is traced inside `loops.unrolled()` (every chunk
step in straight-line code) at two shorter lengths and extrapolated linearly to T (every term of
that program is linear in T: the chunk-parallel einsums and one scan step per chunk);
``chunked (rolled)`` is the program as it runs, whose cost counts one chunk step.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from tessera.aot.compile import make_target  # noqa: E402
from tessera.aot.topology import parse_topology  # noqa: E402
from tessera.kernels import loops  # noqa: E402
from tessera.kernels.delta_rule import delta_rule  # noqa: E402
from tessera.sharding.context import use_mesh  # noqa: E402

HEADS, HEAD_SIZE = 32, 64


def compile_once(mesh, impl: str, batch: int, t: int, dtype, chunk: int | None, flat: bool):
    def arg(shape, dt, *spec):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P(*spec)))

    heads = (batch, t, HEADS, HEAD_SIZE)
    tok = arg((batch, t, HEADS * HEAD_SIZE) if flat else heads, dtype, "data")

    def loss(*xs):
        o, s = delta_rule(*(x.reshape(heads) for x in xs), impl=impl, chunk_size=chunk)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    with use_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
        compiled = fn.trace(*(tok,) * 6).lower().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(
        temp=compiled.memory_analysis().temp_size_in_bytes,
        seconds=float(cost.get("optimal_seconds", float("nan"))),
        flops=float(cost.get("flops", float("nan"))),
        kernel="tpu_custom_call" in compiled.as_text(),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", default="v5p-8")
    parser.add_argument("--batch", type=int, default=4, help="rows per chip")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunks", type=int, nargs="+", default=[16], help="kernel chunk sizes")
    parser.add_argument("--flat", action="store_true",
                        help="inputs [B, T, H * K] reshaped to heads (as the model's projections "
                        "make them) instead of [B, T, H, K] arguments")
    parser.add_argument("--extrapolate-from", type=int, nargs=2, default=[512, 1024])
    args = parser.parse_args()
    devices = np.array(make_target(parse_topology(args.topology)).devices)
    mesh = Mesh(devices.reshape(-1), ("data",))
    batch = args.batch * devices.size
    dtype = jnp.dtype(args.dtype)
    print(f"{args.topology}: {devices.size} chips, {args.batch} rows per chip, H={HEADS}, "
          f"K=V={HEAD_SIZE}, {args.dtype}{', flat inputs' if args.flat else ''}; "
          "one chip's program, jit(value_and_grad)")
    t1, t2 = args.extrapolate_from
    with loops.unrolled():
        small = [compile_once(mesh, "chunked", batch, t, dtype, None, args.flat) for t in (t1, t2)]
    for t in args.lengths:
        kernels = {}
        for c in args.chunks:
            try:
                kernels[c] = compile_once(mesh, "pallas_tpu", batch, t, dtype, c, args.flat)
            except jax.errors.JaxRuntimeError as err:  # e.g. the chunk's blocks overflow VMEM
                kernels[c] = str(err).splitlines()[0][:100]
        rolled = compile_once(mesh, "chunked", batch, t, dtype, None, args.flat)
        frac = (t - t1) / (t2 - t1)
        seconds = small[0]["seconds"] + frac * (small[1]["seconds"] - small[0]["seconds"])
        flops = small[0]["flops"] + frac * (small[1]["flops"] - small[0]["flops"])
        print(f"T={t}")
        for c, kernel in kernels.items():
            if isinstance(kernel, str):
                print(f"  pallas_tpu L={c:<4d}  does not compile: {kernel}")
                continue
            print(f"  pallas_tpu L={c:<4d}  temp {kernel['temp'] / 2**30:8.3f} GiB  "
                  f"optimal {kernel['seconds'] * 1e3:9.3f} ms  flops {kernel['flops']:.3e}  "
                  f"(kernel in program: {kernel['kernel']}; "
                  f"/ chunked unrolled: {kernel['seconds'] / seconds:.3f})")
        print(f"  chunked (rolled)   temp {rolled['temp'] / 2**30:8.3f} GiB  "
              f"optimal {rolled['seconds'] * 1e3:9.3f} ms  flops {rolled['flops']:.3e}")
        print(f"  chunked (unrolled) {'':19} optimal {seconds * 1e3:9.3f} ms  flops {flops:.3e}"
              f"  (extrapolated from T={t1}, {t2})")


if __name__ == "__main__":
    main()
