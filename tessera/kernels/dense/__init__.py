"""Dense layers' products behind one dispatch: ``dense(x, w, contract=1, impl="auto")``
contracts the last ``contract`` axes of x with the first ``contract`` axes of w (attention's
[D] x [D, H, Dh] projections, its [H, Dh] x [H, Dh, D] output, the MLP, the LM head).

impls, in the order auto tries them (`OP`, a `tessera.kernels.registry.Op`):
  cpu   the C++ kernel of ``tessera/kernels/cpu/kernels.cc`` through the XLA FFI (built at first
        use, `tessera.kernels.cpu`). XLA:CPU runs a decode step's few-row products on one core
        at about half the host's memory bandwidth; the kernel splits them (column chunks for
        one row, row blocks of the weights for more) between the calling thread and a helper
        thread. Float32, on CPU, one device, at most `MAX_ROWS` rows. Auto picks it for decode
        steps only (T = 1, axis 1 of x, in a program traced under `cpu.decoding()`, as the
        Decoder's are); gradients are XLA's dots (a custom VJP).
  xla   ``jnp.tensordot``: anything; the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from tessera.kernels import cpu
from tessera.kernels.registry import Impl, Op, impls_getattr

__all__ = ["IMPLS", "MAX_ROWS", "OP", "dense", "dense_many"]

# Rows (batch x tokens) up to which the kernel beat XLA's dot on a 2-core host: 8 llama:small
# layers of products took 2.8 / 4.0 ms at 1 row, 9.0 / 9.8 ms at 16, 12.5 / 12.6 ms at 24, and
# 17.2 / 14.9 ms at 32 (kernel / XLA, measured side by side; docs/design.md).
MAX_ROWS = 16


def _xla(x: jax.Array, ws: Sequence[jax.Array], *, contract: int) -> tuple[jax.Array, ...]:
    return tuple(jnp.tensordot(x, w, axes=contract) for w in ws)


@jax.custom_vjp
def _matmul(x: jax.Array, ws: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return cpu.matmul(x, ws)


def _matmul_fwd(x: jax.Array, ws: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], tuple]:
    return cpu.matmul(x, ws), (x, ws)


def _matmul_bwd(res: tuple, gs: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple]:
    x, ws = res
    dx = sum(g @ w.T for g, w in zip(gs, ws, strict=True))
    return dx, tuple(x.T @ g for g in gs)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _cpu(x: jax.Array, ws: Sequence[jax.Array], *, contract: int) -> tuple[jax.Array, ...]:
    k = math.prod(ws[0].shape[:contract])
    ys = _matmul(x.reshape(-1, k), tuple(w.reshape(k, -1) for w in ws))
    lead = x.shape[: x.ndim - contract]
    return tuple(y.reshape(*lead, *w.shape[contract:]) for y, w in zip(ys, ws, strict=True))


def _cpu_supports(x: jax.Array, ws: Sequence[jax.Array], *, contract: int) -> str | None:
    if len(ws) > cpu.MAX_WEIGHTS:
        return f"{len(ws)} weights > {cpu.MAX_WEIGHTS} in one call"
    rows = math.prod(x.shape[: x.ndim - contract])
    if rows > MAX_ROWS:
        return f"{rows} rows > MAX_ROWS = {MAX_ROWS}"
    return cpu.unavailable(x, *ws)


def _decode_step(x: jax.Array, ws: Sequence[jax.Array], *, contract: int) -> str | None:
    if x.ndim - contract < 2 or x.shape[1] != 1:
        return "not a decode step (T, axis 1 of x, must be 1)"
    return cpu.decode_reason()


OP = Op(
    "dense",
    [
        Impl("cpu", _cpu, supports=_cpu_supports, auto=_decode_step),
        Impl("xla", _xla),
    ],
)

__getattr__ = impls_getattr(OP)  # IMPLS = ("auto", *OP.names)


def dense_many(
    x: jax.Array, ws: Sequence[jax.Array], *, contract: int = 1, impl: str = "auto"
) -> tuple[jax.Array, ...]:
    """x [..., *C] with each w [*C, *O_i] -> a tuple of [..., *O_i] over the ``contract`` axes C:
    the products of one input (attention's q, k, v; the MLP's gate and up) in one call, which
    the kernel splits across threads as one piece of work."""
    ws = tuple(ws)
    if not ws:
        raise ValueError("dense_many: no weights")
    for w in ws:
        if x.shape[x.ndim - contract:] != w.shape[:contract]:
            raise ValueError(
                f"dense: x's last {contract} axes {x.shape[x.ndim - contract:]} do not match "
                f"w's first {w.shape[:contract]}"
            )
    return OP(x, ws, contract=contract, impl=impl)


def dense(x: jax.Array, w: jax.Array, *, contract: int = 1, impl: str = "auto") -> jax.Array:
    """x [..., *C] with w [*C, *O] -> [..., *O] over the ``contract`` axes C (their sizes must
    match), in the dtype of x and w."""
    return dense_many(x, (w,), contract=contract, impl=impl)[0]
