"""tessera's CPU kernels for decode steps (``kernels.cc``, through the XLA FFI): building them,
loading them, calling them. `matmul` is the `tessera.kernels.dense` op's ``cpu`` impl,
`decode_attention` the `tessera.kernels.attention` op's ``cpu_decode``: XLA:CPU runs a decode
step's few-row products and its attention over the cache on one core, and these split the work
between the calling thread and a helper thread (see the comment at the top of ``kernels.cc``).

The C++ source is compiled at first use with the host's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) and ``-O3 -march=native`` against jax's XLA FFI headers
(``jax.ffi.include_dir()``), into ``$TESSERA_KERNEL_CACHE`` (default
``~/.cache/tessera/kernels``) under a key of the source, the jax version, the compiler and the
CPU model and flags, so a cached build is never used on another CPU or jax. A build takes about
3 s and is written atomically (processes building at once each write a whole file).
``TESSERA_CPU_KERNELS=0`` turns the kernels off (every ``supports`` check then says so), as
``with disabled():`` does for the programs traced inside; ``TESSERA_CPU_KERNELS_THREADS=1`` runs
them on the calling thread alone; ``TESSERA_CPU_KERNELS_SPIN_US`` (default 2000) is how long the
helper thread spins for the next call before it parks.

Linux x86-64 only (the helper thread parks on a futex). When the build is not possible the
reason is kept and the impls' ``supports`` checks return it, so ``impl="auto"`` runs XLA and a
named impl says why it cannot run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from tessera.kernels.platform import target_platform
from tessera.sharding.context import active

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cc")
DENSE = "tessera_cpu_dense"
ATTENTION = "tessera_cpu_decode_attention"
MAX_WEIGHTS = 8  # products per `matmul` call (kernels.cc's kMaxParts)
# TESSERA_CPU_KERNELS_MARCH: the -march the kernels are built for (default native; the tests
# also build an x86-64-v3 one, without AVX-512, to check the portable paths).
FLAGS = ("-O3", f"-march={os.environ.get('TESSERA_CPU_KERNELS_MARCH', 'native')}", "-std=c++17",
         "-shared", "-fPIC")

log = logging.getLogger(__name__)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU model and feature flags (-march=native code runs only where these hold)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def cache_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "tessera", "kernels")
    return os.environ.get("TESSERA_KERNEL_CACHE", default)


def library_path(compiler: str) -> str:
    """Where the build for this source, jax, compiler and CPU lives."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256()
    for part in (source, jax.__version__.encode(), compiler.encode(), " ".join(FLAGS).encode(),
                 _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return os.path.join(cache_dir(), f"cpu_kernels-{key.hexdigest()[:16]}.so")


def build(compiler: str, out: str) -> None:
    """Compile ``SOURCE`` into ``out`` (atomically); raises RuntimeError with the compiler's
    first error lines."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), SOURCE, "-o", tmp, "-lpthread"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if "error" in ln][:3]
            raise RuntimeError(
                f"{os.path.basename(compiler)} failed on kernels.cc: "
                + ("; ".join(errors) or done.stderr.strip()[-300:])
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.cache
def load() -> str | None:
    """Build (or find) and register the kernels once per process; None when they are ready,
    else why they are not."""
    if os.environ.get("TESSERA_CPU_KERNELS", "1") == "0":
        return "turned off by TESSERA_CPU_KERNELS=0"
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        return f"built for Linux x86-64 only (this is {platform.system()} {platform.machine()})"
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found (set CXX)"
    path = library_path(compiler)
    if not os.path.exists(path):
        start = time.perf_counter()
        try:
            build(compiler, path)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            return f"could not build the CPU kernels: {e}"
        log.info("built the CPU kernels in %.1f s: %s", time.perf_counter() - start, path)
    try:
        lib = ctypes.cdll.LoadLibrary(path)
        for target, symbol in ((DENSE, lib.TesseraCpuDense),
                               (ATTENTION, lib.TesseraCpuDecodeAttention)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, AttributeError) as e:
        return f"could not load {path}: {e}"
    return None


_state = threading.local()


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
    setattr(_state, name, getattr(_state, name, 0) + 1)
    try:
        yield
    finally:
        setattr(_state, name, getattr(_state, name) - 1)


def disabled() -> contextlib.AbstractContextManager[None]:
    """Programs traced inside do not use the CPU kernels (auto runs XLA), e.g. to compare."""
    return _flag("off")


def decoding() -> contextlib.AbstractContextManager[None]:
    """Programs traced inside are decode programs (`tessera.serve.Decoder` traces its programs
    so): the only ones where ``impl="auto"`` picks the CPU kernels. Elsewhere a one-token
    product or attention (ViT's MAP head in training) stays on XLA, where cost analysis and
    sharding see it; a named impl runs anywhere it supports."""
    return _flag("decode")


def decode_reason() -> str | None:
    """An ``auto`` check: None inside `decoding`, else why auto passes the kernels over."""
    if getattr(_state, "decode", 0):
        return None
    return "not in a decode program (tessera.serve.Decoder traces those)"


def unavailable(*arrays: jax.Array) -> str | None:
    """An impl ``supports`` check: None when the kernels can run on ``arrays`` here (float32, a
    CPU program on one device, the kernels built), else why not."""
    if getattr(_state, "off", 0):
        return "turned off by tessera.kernels.cpu.disabled()"
    platform = target_platform()
    if platform != "cpu":
        return f"a CPU kernel (the program runs on {platform})"
    dtypes = {jnp.dtype(a.dtype).name for a in arrays}
    if dtypes != {"float32"}:
        return f"float32 only (got {', '.join(sorted(dtypes))})"
    ctx = active()
    if ctx is not None and ctx[0].size > 1:
        return f"the program runs on {ctx[0].size} devices (the kernels take whole arrays)"
    return load()


def matmul(x: jax.Array, ws: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """x [M, K] @ each w [K, N_i] -> a tuple of [M, N_i], float32, in one kernel call (`load`
    must have said None; at most `MAX_WEIGHTS` weights)."""
    outs = tuple(jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32) for w in ws)
    return tuple(jax.ffi.ffi_call(DENSE, outs, vmap_method="sequential")(x, *ws))


def decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
    """q [B, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv], mask [B, S] (1: the row sees the
    slot) -> [B, Hq, Dv], all float32: softmax(scale q k) v per query head over its kv head's
    visible slots (zeros where none is visible)."""
    out = jax.ShapeDtypeStruct((q.shape[0], q.shape[1], v.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(ATTENTION, out, vmap_method="sequential")(
        q, k, v, mask, scale=np.float32(scale)
    )
