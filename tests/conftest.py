"""Test set-up: 8 host CPU devices for mesh tests, float32 matmuls, no TPU probing."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests build the same tiny programs (a trainer per test, resumed runs, CLI subprocesses):
# JAX's persistent compilation cache, shared by the xdist workers and the subprocesses they
# start (the environment carries it), compiles each program once per checkout. The key is the
# program, the compile options and the jax/XLA versions, so a stale entry is never reused.
# TESSERA_TEST_COMPILE_CACHE="" turns it off.
_CACHE = os.environ.setdefault(
    "TESSERA_TEST_COMPILE_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"),
)
if _CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture
def pallas_interpret():
    """Pallas TPU / GPU kernels run in interpret mode (on CPU) for the test's duration."""
    from tessera.kernels.platform import interpreting

    with interpreting():
        yield
