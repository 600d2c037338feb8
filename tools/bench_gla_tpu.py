"""AOT figures for the Pallas TPU GLA kernels: one v5p chip's program (a 1-device v5p mesh from
libtpu's v5p-8 topology, on any host), jit(value_and_grad(sum of the outputs)), per-chip batch 4,
bfloat16 q, k, v as token-major [B, T, H*D] parameters: ``impl="pallas_tpu"`` against
``impl="chunked"`` (XLA), memory_analysis temp bytes and cost_analysis optimal_seconds.

    PYTHONPATH=. JAX_PLATFORMS=cpu python tools/bench_gla_tpu.py MODEL T IMPL UNROLL

MODEL retnet (RetNet-1.3B: 8 heads, K 256, V 512, scalar decay), rwkv6 (RWKV-6-1.6B: 32 heads of
64, per channel, u) or mamba2 (Mamba-2 ~1.3B SSD: 64 heads, P 64, N 128, one group); IMPL
pallas_tpu or chunked; UNROLL 1 traces inside `tessera.kernels.loops.unrolled()` (the chunked
form's between-chunk scan unrolled, since cost_analysis counts a loop body once).
"""
import os
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.aot.compile import make_target
from tessera.aot.topology import parse_topology
from tessera.kernels import loops
from tessera.kernels.gla import gla
from tessera.kernels.ssd import ssd
from tessera.sharding.context import use_mesh

devices = np.array(make_target(parse_topology("v5p-8")).devices)
mesh = Mesh(devices[:1].reshape(1, 1), ("data", "tensor"))
B = 4
SHAPES = {  # name: (kind, H, K, V, bonus)
    "retnet": ("gla", 8, 256, 512, False, True),
    "rwkv6": ("gla", 32, 64, 64, True, False),
    "mamba2": ("ssd", 64, 128, 64, False, True),
}

def arg(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))

def build(name, t, impl):
    """Token-major parameters [B, T, H*D] (what the models' projections produce), reshaped to
    heads inside the program, for both impls alike."""
    kind, h, dk, dv, bonus, scalar = SHAPES[name]
    bf = jnp.bfloat16
    if kind == "gla":
        args = [arg((B, t, h * dk), bf), arg((B, t, h * dk), bf), arg((B, t, h * dv), bf),
                arg((B, t, h) if scalar else (B, t, h * dk), jnp.float32)]
        if bonus:
            args.append(arg((h, dk), jnp.float32))
        def loss(q, k, v, g, *u):
            heads = lambda a: a.reshape(B, t, h, -1)
            g = g if scalar else heads(g)
            o, s = gla(heads(q), heads(k), heads(v), g, u=u[0] if bonus else None,
                       scale=dk ** -0.5, impl=impl)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
    else:
        args = [arg((B, t, h * dv), bf), arg((B, t, h), jnp.float32), arg((h,), jnp.float32),
                arg((B, t, dk), bf), arg((B, t, dk), bf), arg((h,), jnp.float32)]
        def loss(x, dt, A, Bm, C, D):
            y, s = ssd(x.reshape(B, t, h, dv), dt, A, Bm[:, :, None], C[:, :, None], D, impl=impl)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
    return fn, args

def measure(name, t, impl, unroll):
    t0 = time.time()
    fn, args = build(name, t, impl)
    with use_mesh(mesh):
        if unroll:
            with loops.unrolled():
                c = fn.trace(*args).lower().compile()
        else:
            c = fn.trace(*args).lower().compile()
    ca = c.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    m = c.memory_analysis()
    return dict(temp=m.temp_size_in_bytes, opt=ca.get("optimal_seconds"), flops=ca.get("flops"),
                bytes=ca.get("bytes accessed"), secs=time.time() - t0)

if __name__ == "__main__":
    name, t, impl, unroll = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    r = measure(name, t, impl, unroll)
    print(f"{name} T={t} {impl}{' unrolled' if unroll else ''}: temp {r['temp']/2**30:.3f} GiB, "
          f"optimal {r['opt']*1e3:.2f} ms, flops {r['flops']:.3e}, bytes {r['bytes']:.3e} "
          f"(compile {r['secs']:.0f} s)", flush=True)
