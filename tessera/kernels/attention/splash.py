"""Training / no-cache prefill attention on TPU through jax's Pallas splash attention kernel.

`attention` runs ``jax.experimental.pallas.ops.tpu.splash_attention`` (block-sparse flash
attention with its own custom VJP: separate dq and dk/dv kernels) on q [B, T, Hq, D], k [B, T,
Hkv, D], v [B, T, Hkv, Dv] -> [B, T, Hq, Dv], under `tessera.sharding.shard_map_kernel` (batch and
heads split as the mesh splits them, the sequence whole on every device).

Splash masks by array index, not by position, so it takes only ``index_aligned=True`` calls
(self attention with no cache, where within a segment positions rise by one per index and index
masks equal position masks); ``q_positions`` / ``kv_positions`` are then not read, segment ids
carry the packing. What it covers:

- causal and bidirectional; ``sliding_window=W`` keeps ``q - k < W`` as `reference` does
  (splash ``LocalMask((W - 1, 0))`` causal, ``(W - 1, None)`` bidirectional); the block-sparse
  schedule skips the key blocks causal / window masking hides;
- packed segment ids (splash ``SegmentIds``); a query of segment 0 (padding) returns 0 as in
  `reference` (it attends its padding neighbours inside the kernel, then is zeroed, so no row of
  the kernel is ever empty);
- ``logit_soft_cap`` (splash ``attn_logits_soft_cap``, applied to the scaled scores);
  ``scale`` by pre-scaling q (splash itself does not scale);
- MHA / GQA / MQA without repeating K and V (splash's MHA kernel maps q head h to kv head
  h // (Hq // Hkv), and its dk / dv kernel sums over each group);
- any head dims, Dv != D included (MLA's training form): splash's kernels take the head dim
  whole; 64, 80, 96, 128, 192, 256 and (192, 128) compile for v5e (tests/kernels/
  test_attention_splash.py compiles a sample on v5e / v5p / v6e), so nothing is padded;
- lengths that are not a multiple of 128: the sequence is padded to one, the padding is its own
  segment (0) that no real query sees (or, causal without segments, lies after every real
  query), and the output is sliced back.

Block sizes come from `BLOCKS`, one row per TPU generation (the target's ``device_kind``),
clipped to the padded length. They are compile-checked, not tuned on hardware.

XLA's cost model cannot see inside a Pallas call (``cost_analysis()`` gives it no FLOPs, bytes
or time) and splash passes no ``pl.CostEstimate``. `install_cost_estimates` gives splash's
``pallas_call`` one for each of its kernels from the blocks the kernel visits (registered
here when a kernel is built), so `tessera.aot`'s predicted step time counts attention. XLA's TPU
cost model then answers about -1 s of ``optimal_seconds`` per Pallas call whose estimate passes a
few hundred GFLOP (the dk/dv kernel at B=1, H=8, T=8192, D=128 on v5e; tokamax's kernels, which
carry their own estimates, alike); `tessera.aot` then predicts from its roofline instead.

Runs on TPU, and anywhere in Pallas interpret mode (`tessera.kernels.platform.interpreting`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tessera.kernels.attention import reference
from tessera.kernels.platform import interpret, kernel_platform_reason, target_device
from tessera.sharding.context import active
from tessera.sharding.kernels import shard_map_kernel

LANES = 128  # splash's blocks are multiples of this; the sequence is padded to one


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Splash tile sizes: forward (q, kv, kv_compute) and backward (q, kv for dk/dv and dq)."""

    q: int = 512
    kv: int = 512
    kv_compute: int = 512
    q_bwd: int = 512
    kv_bwd: int = 512


# One row per TPU generation, keyed as `generation` names them. 512-wide tiles (MaxText's
# defaults) everywhere; v5p and v6e stream 1024 keys per forward step. Compile-checked (fwd +
# bwd, bf16, T 2048, soft cap, segments) at D 128 and 256 on v4, v5p, v6e and D 64..256 on v5e;
# not yet tuned on hardware.
BLOCKS: dict[str, Blocks] = {
    "default": Blocks(),
    "v4": Blocks(),
    "v5e": Blocks(),
    "v5p": Blocks(kv=1024),
    "v6e": Blocks(kv=1024),
}


def generation(device_kind: str) -> str:
    """A `BLOCKS` key from a device's ``device_kind`` ("TPU v5 lite" -> "v5e")."""
    kind = device_kind.lower()
    for names, key in (
        (("v5 lite", "v5e", "v5litepod"), "v5e"),
        (("v6 lite", "v6e"), "v6e"),
        (("v5p", "v5"), "v5p"),
        (("v4",), "v4"),
    ):
        if any(n in kind for n in names):
            return key
    return "default"


def _fit(block: int, length: int) -> int:
    """The largest multiple of LANES <= block that divides ``length`` (a multiple of LANES)."""
    block = min(block, length)
    while length % block:
        block -= LANES
    return block


def block_sizes(b: Blocks, length: int):
    """splash ``BlockSizes`` from a `BLOCKS` row, clipped to the padded sequence ``length``."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    q, kv, q_bwd, kv_bwd = (_fit(x, length) for x in (b.q, b.kv, b.q_bwd, b.kv_bwd))
    return sa.BlockSizes(
        block_q=q, block_kv=kv, block_kv_compute=_fit(min(b.kv_compute, kv), kv),
        block_q_dkv=q_bwd, block_kv_dkv=kv_bwd, block_kv_dkv_compute=kv_bwd,
        block_q_dq=q_bwd, block_kv_dq=kv_bwd,
    )


# -- cost estimates for splash's Pallas calls ------------------------------------------------------
# (mask_function, phase, block_q, block_kv) -> blocks the kernel visits, summed over heads;
# filled by `_kernel` from splash's own block masks, read by the estimating pallas_call.
_VISITED: dict[tuple[Any, str, int, int], int] = {}


def _count(info: Any, heads: int) -> int | None:
    """Visited (q block, kv block) pairs over all heads of one splash MaskInfo."""
    if info is None or info.block_mask is None:
        return None
    mask = np.asarray(info.block_mask)
    per = int(np.count_nonzero(mask))
    return per * heads // mask.shape[0]


def _nbytes(x: Any) -> int:
    return 0 if x is None else int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def _estimate(name: str, kernel: Any, out_shape: Any, args: tuple) -> Any:
    """A ``pl.CostEstimate`` for one splash kernel call (per batch element; vmap multiplies)."""
    from jax.experimental import pallas as pl

    phase = "dkv" if "_dkv" in name else "dq" if "_dq" in name else "fwd"
    kw = getattr(kernel, "keywords", {})
    bq, bkv = kw.get("bq"), kw.get("bkv")
    q, k, v = args[3], args[4], args[5]
    if bq is None or bkv is None or q.ndim != 3:
        return None
    heads, t, d = q.shape
    s, dv = k.shape[-2], v.shape[-1]
    visited = _VISITED.get((kw.get("mask_function"), phase, bq, bkv))
    if visited is None:  # no mask function: a full mask, every block
        visited = heads * (t // bq) * (s // bkv)
    fused = phase == "dkv" and isinstance(out_shape, list | tuple) and out_shape[0] is not None
    per_entry = {"fwd": d + dv, "dq": 2 * d + dv, "dkv": 2 * d + 2 * dv + (d if fused else 0)}
    entries = visited * bq * bkv
    cap = 2 if kw.get("attn_logits_soft_cap") is not None else 1
    item = jnp.dtype(q.dtype).itemsize
    outs = out_shape if isinstance(out_shape, list | tuple) else [out_shape]
    once = sum(_nbytes(a) for a in args[3:]) + sum(_nbytes(o) for o in outs)
    if phase == "dkv":  # q, do (and lse, di) stream past each kv block
        streamed = bq * (d + dv) * item + 2 * 8 * bq * 4
    else:  # k, v stream past each q block
        streamed = bkv * (d + dv) * item
    return pl.CostEstimate(
        flops=2 * entries * per_entry[phase],
        transcendentals=cap * entries,
        bytes_accessed=once + visited * streamed,
    )


_ESTIMATES = {"on": True}


def set_cost_estimates(enabled: bool) -> None:
    """Attach splash's cost estimates to the kernels traced from now on (the default), or leave
    them uncosted as XLA does by default: ``tessera.aot --no-splash_estimates``, to compare with
    a program costed that way (MaxText's flash programs in ``tools/compare_maxtext.py``)."""
    _ESTIMATES["on"] = bool(enabled)


def _estimating_pallas_call(pallas: types.ModuleType):
    def pallas_call(kernel, *, out_shape, name=None, cost_estimate=None, **kw):
        if (not _ESTIMATES["on"] or cost_estimate is not None
                or not (name or "").startswith("splash_")):
            return pallas.pallas_call(
                kernel, out_shape=out_shape, name=name, cost_estimate=cost_estimate, **kw
            )

        def call(*args):
            estimate = _estimate(name, kernel, out_shape, args)
            return pallas.pallas_call(
                kernel, out_shape=out_shape, name=name, cost_estimate=estimate, **kw
            )(*args)

        return call

    return pallas_call


def install_cost_estimates() -> None:
    """Make splash's kernels carry a ``pl.CostEstimate`` (idempotent).

    splash calls ``pl.pallas_call`` through its module's ``pl`` name; this swaps that name for a
    view of ``jax.experimental.pallas`` whose ``pallas_call`` adds an estimate to calls named
    ``splash_*`` that bring none. Other code, and other names, are untouched.
    """
    from jax.experimental import pallas
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    if getattr(sk.pl, "_tessera_estimates", False):
        return
    view = types.ModuleType("tessera_splash_pallas")
    view.__dict__.update(vars(pallas))
    view.pallas_call = _estimating_pallas_call(pallas)
    view._tessera_estimates = True
    sk.pl = view


# -- the kernel ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _kernel(heads: int, length: int, causal: bool, window: int | None, soft_cap: float | None,
            blocks_row: Blocks, interpret_mode: bool):
    """A splash MHA kernel for [heads, length, D] queries (one batch element)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    install_cost_estimates()
    shape = (length, length)
    if window is not None:
        mask = sa.LocalMask(shape, window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        mask = sa.CausalMask(shape)
    else:
        mask = sa.FullMask(shape)
    blocks = block_sizes(blocks_row, length)
    # Concrete mask-info arrays (not the current trace's constants): the kernel is cached
    # across traces, and its block counts are read here.
    with jax.ensure_compile_time_eval():
        kernel = sa.make_splash_mha(
            sa.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
            attn_logits_soft_cap=soft_cap, interpret=interpret_mode,
        )
    fn = kernel.kwargs.get("mask_function")
    if fn is not None:
        for phase, info, bq, bkv in (
            ("fwd", kernel.fwd_mask_info, blocks.block_q, blocks.block_kv),
            ("dq", kernel.dq_mask_info, blocks.block_q_dq, blocks.block_kv_dq),
            ("dkv", kernel.dkv_mask_info, blocks.block_q_dkv, blocks.block_kv_dkv),
        ):
            count = _count(info, heads)
            if count is not None:
                _VISITED[(fn, phase, bq, bkv)] = count
    return kernel


def _batched(config: tuple, q: jax.Array, k: jax.Array, v: jax.Array, segs: Any) -> jax.Array:
    """splash over the batch: q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]."""
    kernel = _kernel(*config)
    if segs is None:
        return jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, segs)


def _precision(dtype: Any):
    """The matmul precision splash's kernels are traced under: Mosaic cannot contract bfloat16
    operands at float32 precision, so a ``highest`` default (set for the CPU tests) would not
    compile; float32 inputs keep the caller's setting."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return jax.default_matmul_precision("default")
    return contextlib.nullcontext()


# splash under our own VJP only to trace its backward kernels under `_precision` too (jax
# traces a custom VJP's backward when the caller differentiates, outside this module's frames).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _splash(config: tuple, q: jax.Array, k: jax.Array, v: jax.Array, segs: Any) -> jax.Array:
    with _precision(q.dtype):
        return _batched(config, q, k, v, segs)


def _splash_fwd(config, q, k, v, segs):
    with _precision(q.dtype):
        out, vjp = jax.vjp(functools.partial(_batched, config), q, k, v, segs)
    return out, vjp


def _splash_bwd(config, vjp, g):
    with _precision(g.dtype):  # the output's dtype: q's
        dq, dk, dv, _ = vjp(g)
    return dq, dk, dv, None


_splash.defvjp(_splash_fwd, _splash_bwd)


def _local(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
           kv_seg: jax.Array | None, *, causal: bool, window: int | None, scale: float,
           soft_cap: float | None, gen: str) -> jax.Array:
    """One device's block: q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, hq, _ = q.shape
    dtype = q.dtype
    q = (q.astype(jnp.float32) * scale).astype(dtype)
    padded = -(-t // LANES) * LANES
    pad = padded - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    if q_seg is None and pad and not causal:  # padding keys must stay out of real rows
        q_seg = kv_seg = jnp.ones((b, t), jnp.int32)
    segs = None
    if q_seg is not None:
        segs = sa.SegmentIds(
            q=jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, pad))),
            kv=jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, pad))),
        )
    config = (hq, padded, causal, window, soft_cap, BLOCKS.get(gen, BLOCKS["default"]),
              interpret())
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    out = _splash(config, heads_first(q), heads_first(k), heads_first(v), segs)
    out = heads_first(out)[:, :t]
    if q_seg is not None:  # segment 0 is padding: no keys, output 0 (as reference)
        out = jnp.where((q_seg > 0)[:, :, None, None], out, 0)
    return out.astype(dtype)


def supports(q: jax.Array, k: jax.Array, v: jax.Array, *, index_aligned: bool = False,
             kv_valid: jax.Array | None = None, **kw: Any) -> str | None:
    """None when the splash kernel can run these inputs, else why not (static facts only)."""
    reason = kernel_platform_reason("tpu")
    if reason is not None:
        return reason
    if not index_aligned:
        return "splash masks by index: needs index_aligned=True (self attention, no cache)"
    if kv_valid is not None:
        return "kv_valid (cache slots) is not supported: splash runs only without a cache"
    if q.shape[1] != k.shape[1]:
        return f"T = {q.shape[1]} != S = {k.shape[1]} (index-aligned self attention only)"
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or not dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}:
        return f"q, k, v must share float32 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    kv_valid: jax.Array | None = None,
    index_aligned: bool = False,
    logit_soft_cap: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """`reference.attention` for index-aligned calls, q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T,
    Hkv, Dv] -> [B, T, Hq, Dv], by splash (see the module docstring). Positions are not read;
    block_q / block_kv (xla_chunked's tiles) are ignored: tiles come from `BLOCKS`."""
    reference.check_inputs(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window,
        kv_valid, logit_soft_cap,
    )
    reason = supports(q, k, v, index_aligned=index_aligned, kv_valid=kv_valid)
    if reason is not None:
        raise ValueError(f"splash attention cannot run these inputs: {reason}")
    local = functools.partial(
        _local, causal=causal, window=sliding_window,
        scale=q.shape[-1] ** -0.5 if scale is None else scale, soft_cap=logit_soft_cap,
        gen=generation(target_device().device_kind),
    )
    # q's and k's heads share one logical name so that they split together (GQA groups stay
    # whole); a single kv head (MQA) is replicated instead, so q's heads can still split.
    q_axes = ("batch", "length", "act_heads", None)
    kv_axes = q_axes if k.shape[2] > 1 else ("batch", "length", None, None)
    seg_axes = ("batch", "length")
    ctx = active()
    unsplit = () if ctx is None else tuple(
        a for a in ctx[1].get("length", ()) if a in ctx[0].axis_names
    )
    run = shard_map_kernel(
        local, in_axes=(q_axes, kv_axes, kv_axes, seg_axes, seg_axes), out_axes=q_axes,
        unsplit=unsplit,
    )
    return run(q, k, v, q_segment_ids, kv_segment_ids)
