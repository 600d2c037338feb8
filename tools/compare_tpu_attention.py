"""Compare TPU training attention kernels by AOT compilation (no TPU needed, libtpu is).

Candidates: tessera's ``pallas_tpu`` (jax's splash attention, `tessera.kernels.attention.splash`),
tokamax's ``dot_product_attention(implementation="mosaic_tpu")`` (its own splash fork) when
tokamax is importable, and tessera's ``xla_chunked`` as the XLA baseline. For each shape it
compiles forward + backward (grads of q, k, v) for one chip and prints XLA's
``memory_analysis()`` temp bytes, ``cost_analysis()`` FLOPs, bytes and ``optimal_seconds``, and
the roofline max(FLOPs / peak, bytes / HBM bandwidth) of the chip (XLA's optimal_seconds turns
negative, about -1 s per kernel, once one Pallas call's estimate passes a few hundred GFLOP);
then it compiles each feature (masks, GQA, head dims, odd lengths) at a small shape and prints which
kernels take it.

    PYTHONPATH=. python tools/compare_tpu_attention.py --topology=v5e-1

tokamax needs its own environment next to the same jax (it pins nothing newer here):
``python -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install tokamax jax==<jax> libtpu==<v>``
and tessera's dependencies on the path. XLA cannot see inside a Pallas call: splash's figures
use tessera's cost estimate (`splash.install_cost_estimates`), tokamax's its own.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

from tessera.aot.topology import parse_topology, quiet_libtpu_env

quiet_libtpu_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, SingleDeviceSharding  # noqa: E402

from tessera.aot import analysis  # noqa: E402
from tessera.aot.compile import make_target  # noqa: E402
from tessera.kernels import loops  # noqa: E402
from tessera.kernels.attention import attention  # noqa: E402
from tessera.sharding.context import use_mesh  # noqa: E402
from tessera.sharding.mesh import MESH_AXES  # noqa: E402

try:
    import tokamax
except ImportError:  # tokamax is optional: its rows are left out
    tokamax = None


def _segments(b: int, t: int) -> jax.Array:
    """Two packed documents per row, the last 8 tokens padding (segment 0)."""
    idx = jnp.arange(t)
    return jnp.broadcast_to(jnp.where(idx < t // 2, 1, jnp.where(idx < t - 8, 2, 0)), (b, t))


def tessera_fn(impl: str, case: dict) -> Callable:
    def fn(q, k, v):
        b, t = q.shape[:2]
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        seg = _segments(b, t) if case.get("segments") else None
        return attention(
            q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
            causal=case.get("causal", True), sliding_window=case.get("window"),
            logit_soft_cap=case.get("soft_cap"), index_aligned=True, impl=impl,
        )

    return fn


def tokamax_fn(case: dict) -> Callable:
    def fn(q, k, v):
        mask = None
        if case.get("segments"):  # tokamax has no segment ids: a dense [B, 1, T, S] mask
            seg = _segments(q.shape[0], q.shape[1])
            mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0))[:, None]
        window = case.get("window")
        return tokamax.dot_product_attention(
            q, k, v, mask=mask, is_causal=case.get("causal", True),
            local_window_size=None if window is None else (window - 1, 0),
            logits_soft_cap=case.get("soft_cap"), implementation="mosaic_tpu",
        )

    return fn


def compile_grad(fn: Callable, device, b: int, t: int, hq: int, hkv: int, d: int, dv: int,
                 unroll: bool = False):
    """fwd + bwd of ``fn`` compiled for ``device``: (compiled, seconds). ``unroll`` traces
    xla_chunked's tile loops unrolled, so that cost_analysis counts every tile (it counts a loop
    body once), as tessera.aot's predictions do."""

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

    s = SingleDeviceSharding(device)
    args = [
        jax.ShapeDtypeStruct((b, t, h, x), jnp.bfloat16, sharding=s)
        for h, x in ((hq, d), (hkv, d), (hkv, dv))
    ]
    t0 = time.perf_counter()
    # A one-device mesh of the TPU device: tessera's kernels pick by the mesh's platform.
    mesh = Mesh(np.asarray([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
    with use_mesh(mesh), loops.unrolled() if unroll else contextlib.nullcontext():
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args)
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def candidates(case: dict) -> dict[str, Callable]:
    out = {"splash (pallas_tpu)": tessera_fn("pallas_tpu", case)}
    if tokamax is not None:
        out["tokamax mosaic_tpu"] = tokamax_fn(case)
    out["xla_chunked"] = tessera_fn("xla_chunked", case)
    return out


def figures(target, shapes: list[tuple[int, ...]], unroll_max: int) -> None:
    device = target.devices[0]
    print("| kernel | B,H,Hkv,T,D | temp MiB | GFLOP (XLA) | GB accessed | optimal_seconds ms | "
          "roofline ms | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for b, h, hkv, t, d in shapes:
        for name, fn in candidates({"causal": True}).items():
            # unrolled xla_chunked compiles take minutes from T = 4096 on: its loops count once
            unroll = name == "xla_chunked" and t * t <= unroll_max**2
            if name == "xla_chunked" and not unroll:
                name += " (loop bodies once)"
            try:
                c, secs = compile_grad(fn, device, b, t, h, hkv, d, d, unroll)
            except Exception as e:  # noqa: BLE001 - a row saying why
                print(f"| {name} | {b},{h},{hkv},{t},{d} | failed: {str(e).splitlines()[0][:80]} |")
                continue
            mem, cost = c.memory_analysis(), analysis.cost(c)  # libtpu's ConcatBitcast fixed
            flops, nbytes = cost["flops"], cost["bytes_accessed"]
            roofline = max(flops / target.peak_flops_per_device,
                           nbytes / target.hbm_bandwidth_per_device)
            print(
                f"| {name} | {b},{h},{hkv},{t},{d} | {mem.temp_size_in_bytes / 2**20:.1f} | "
                f"{flops / 1e9:.1f} | {nbytes / 1e9:.2f} | "
                f"{cost['optimal_seconds'] * 1e3:.3f} | {roofline * 1e3:.3f} | {secs:.1f} |"
            )


FEATURES = {
    "causal": ({"causal": True}, {}),
    "bidirectional": ({"causal": False}, {}),
    "sliding window 256": ({"window": 256}, {}),
    "packed segment ids": ({"segments": True}, {}),
    "soft cap 30": ({"soft_cap": 30.0}, {}),
    "GQA 8:2": ({}, {"hkv": 2}),
    "MQA 8:1": ({}, {"hkv": 1}),
    "head dim 64": ({}, {"d": 64, "dv": 64}),
    "head dim 96": ({}, {"d": 96, "dv": 96}),
    "head dim 192": ({}, {"d": 192, "dv": 192}),
    "head dim 256": ({}, {"d": 256, "dv": 256}),
    "D 192, Dv 128 (MLA)": ({}, {"d": 192, "dv": 128}),
    "T = 1000 (odd)": ({}, {"t": 1000}),
}


def coverage(device) -> None:
    names = list(candidates({}))
    print("| feature (B=1, H=8, T=1024, D=128 bf16, fwd+bwd) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for feature, (case, shape) in FEATURES.items():
        dims = {"b": 1, "t": 1024, "hq": 8, "hkv": 8, "d": 128, "dv": 128} | shape
        row = []
        for fn in candidates(case).values():
            try:
                compile_grad(fn, device, **dims)
                row.append("yes")
            except Exception as e:  # noqa: BLE001 - the reason is the cell
                row.append("no: " + str(e).splitlines()[0][:60].replace("|", "/"))
        print(f"| {feature} | " + " | ".join(row) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5e-1",
                   help="a topology; its first device compiles, e.g. v5e-1, v5p-8")
    p.add_argument("--shapes", default="1,8,8,2048,128;1,8,8,8192,128",
                   help="B,H,Hkv,T,D;... (bf16, causal)")
    p.add_argument("--no-coverage", action="store_true")
    p.add_argument("--unroll_max", type=int, default=2048,
                   help="longest T at which xla_chunked's loops are unrolled for its cost")
    args = p.parse_args()
    target = make_target(parse_topology(args.topology))
    device = target.devices[0]
    if tokamax is not None:  # lowered on a CPU host for a TPU target, backward pass included
        tokamax.config.cross_compile(True).__enter__()
    print(f"{args.topology} ({device.device_kind}), jax {jax.__version__}, tokamax "
          f"{getattr(tokamax, '__version__', 'not installed')}\n")
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    figures(target, shapes, args.unroll_max)
    if not args.no_coverage:
        print()
        coverage(device)


if __name__ == "__main__":
    main()
