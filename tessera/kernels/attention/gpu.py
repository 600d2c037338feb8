"""GPU attention: cuDNN flash attention, and jax's Pallas (Triton) flash attention for the rest.

Two impls of the attention op, both index-masked flash kernels with their own backward:

- ``cudnn``: ``jax.nn.dot_product_attention(..., implementation="cudnn")``. bf16 / f16, head dim
  a multiple of 8 up to 128 (256 on Hopper and later: jax's ``check_is_flash_attention``), the
  value head dim equal to the query's (``jax.nn`` takes v shaped like k), GQA natively (K / V
  with fewer heads). Causal or bidirectional, and a causal sliding window as cuDNN's left window
  (``local_window_size=(W - 1, 0)``). No segment ids: ``jax.nn``'s arguments can say packed
  sequences only through its ``mask`` (a [B, 1, T, S] bias in memory, what a flash kernel is
  for avoiding) or the private packed layout (``q_offsets``), so packed calls go to pallas_gpu.
  Runs only on a CUDA GPU: interpret mode does not make cuDNN run on CPU.
- ``pallas_gpu``: ``jax.experimental.pallas.ops.gpu.attention.mha`` (deprecated upstream in
  favour of tokamax, still shipped), with its Triton backward. f32 / bf16 / f16, head dims 16 ..
  256 (the kernel pads them to a power of two itself), causal or bidirectional, packed segment
  ids (one array for queries and keys: index-aligned self attention), T == S. Lengths are padded
  to the kernel's blocks (a power of two from 32 up to 128, then multiples of 128); padding keys
  get segment 0. The kernel's segment mask is plain equality, so queries of segment 0 (padding,
  which sees nothing in our contract) are zeroed after it. GQA repeats K / V per query head (the
  kernel reads one kv head per query head); repeat's gradient sums the groups back. f32 runs at
  Triton's default dot precision (TF32 on Ampere and later), as XLA's default f32 dot on GPU
  does; where ``jax_default_matmul_precision`` asks for full float32, auto passes it over for
  f32 inputs (it runs when named). Runs on a GPU, and anywhere in Pallas interpret mode (the CPU
  tests).

Both mask by index, so a causal, windowed or packed call must promise ``index_aligned=True``
(positions then mask exactly as indices do); a bidirectional call with no segments, window or
kv_valid masks nothing, whatever the positions. Neither takes kv_valid (cache slots: decode) or
a logit soft cap. Under an active mesh both run per shard (``shard_map_kernel``) with the
sequence axis gathered.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from tessera.kernels.platform import interpret, kernel_platform_reason, target_platform, tf32_reason
from tessera.sharding.context import active
from tessera.sharding.kernels import shard_map_kernel

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
PALLAS_MIN_HEAD_DIM = 16  # Triton's dot needs every tile dimension >= 16
PALLAS_MAX_HEAD_DIM = 256
# Forward query / key blocks and backward blocks: jax's defaults for `mha` (no tuning measured).
PALLAS_BLOCK = 128
PALLAS_BACKWARD_BLOCK = 32

_QKV = ("batch", "length", "act_heads", None)
_SEG = ("batch", "length")


def _contract_reason(
    q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array | None,
    causal: bool, sliding_window: int | None, kv_valid: jax.Array | None, index_aligned: bool,
    logit_soft_cap: float | None,
) -> str | None:
    """What neither GPU kernel can express (both mask by index), else None."""
    if logit_soft_cap is not None:
        return "logit_soft_cap (the kernel has no soft cap)"
    if kv_valid is not None:
        return "kv_valid (the kernel masks by index, not by filled cache slot)"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} != query head dim {q.shape[-1]}"
    masked = causal or sliding_window is not None or q_segment_ids is not None
    if masked and not (index_aligned and q.shape[1] == k.shape[1]):
        return "causal / window / segment masking by index needs index_aligned=True (T == S)"
    return None


def _cuda_devices() -> list:
    ctx = active()
    return list(ctx[0].devices.flat) if ctx is not None else jax.devices()


def cudnn_max_head_dim() -> int:
    """cuDNN's largest flash-attention head dim on this GPU: 256 from Hopper (sm 9.0), else 128."""
    cc = getattr(_cuda_devices()[0], "compute_capability", None)
    major = int(str(cc).split(".")[0]) if cc else 0
    return 256 if major >= 9 else 128


def cudnn_supports(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids=None,
                   causal: bool = True, sliding_window: int | None = None, kv_valid=None,
                   index_aligned: bool = False, logit_soft_cap: float | None = None,
                   **_) -> str | None:
    """None when cuDNN flash attention runs these inputs exactly, else why not."""
    if target_platform() != "gpu":
        return f"cuDNN needs a CUDA GPU (the program runs on {target_platform()})"
    reason = _contract_reason(
        q, k, v, q_segment_ids=q_segment_ids, causal=causal, sliding_window=sliding_window,
        kv_valid=kv_valid, index_aligned=index_aligned, logit_soft_cap=logit_soft_cap,
    )
    if reason is not None:
        return reason
    if q.dtype not in CUDNN_DTYPES:
        return f"dtype {q.dtype} (cuDNN flash attention takes bfloat16 / float16)"
    d, d_max = q.shape[-1], cudnn_max_head_dim()
    if d % 8 or d > d_max:
        return f"head dim {d} (cuDNN: a multiple of 8, at most {d_max} on this GPU)"
    if q_segment_ids is not None:
        return "segment ids (jax.nn.dot_product_attention cannot say packed sequences)"
    if sliding_window is not None and not causal:
        return "a bidirectional sliding window (cuDNN's window is left-only)"
    return None


def cudnn_arguments(q: jax.Array, *, causal: bool, sliding_window: int | None,
                    scale: float | None) -> dict:
    """Our arguments as ``jax.nn.dot_product_attention`` keywords (for the inputs
    `cudnn_supports` accepts): ``is_causal``, ``scale``, ``local_window_size``."""
    kwargs = {"is_causal": causal, "scale": q.shape[-1] ** -0.5 if scale is None else scale}
    if sliding_window is not None:
        kwargs["local_window_size"] = (sliding_window - 1, 0)  # keys q - W < k <= q
    return kwargs


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    sliding_window: int | None = None, scale: float | None = None,
                    **_) -> jax.Array:
    """q [B, T, Hq, D], k / v [B, S, Hkv, D] -> [B, T, Hq, D] through cuDNN (see module doc)."""
    kwargs = cudnn_arguments(q, causal=causal, sliding_window=sliding_window, scale=scale)

    def run(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)

    return shard_map_kernel(run, in_axes=(_QKV, _QKV, _QKV), out_axes=_QKV,
                            unsplit=_unsplit())(q, k, v)


def pallas_supports(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids=None,
                    causal: bool = True, sliding_window: int | None = None, kv_valid=None,
                    index_aligned: bool = False, logit_soft_cap: float | None = None,
                    **_) -> str | None:
    """None when jax's Pallas GPU flash attention runs these inputs, else why not."""
    reason = kernel_platform_reason("gpu") or _contract_reason(
        q, k, v, q_segment_ids=q_segment_ids, causal=causal, sliding_window=sliding_window,
        kv_valid=kv_valid, index_aligned=index_aligned, logit_soft_cap=logit_soft_cap,
    )
    if reason is not None:
        return reason
    if q.dtype not in PALLAS_DTYPES:
        return f"dtype {q.dtype} (float32 / bfloat16 / float16)"
    d = q.shape[-1]
    if not PALLAS_MIN_HEAD_DIM <= d <= PALLAS_MAX_HEAD_DIM:
        return f"head dim {d} (the kernel takes {PALLAS_MIN_HEAD_DIM} .. {PALLAS_MAX_HEAD_DIM})"
    if sliding_window is not None:
        return "sliding_window (the kernel has no window)"
    if q.shape[1] != k.shape[1]:
        return f"T = {q.shape[1]} != S = {k.shape[1]} (the kernel's backward needs T == S)"
    return None


def pallas_auto(q: jax.Array, *args, **kwargs) -> str | None:
    """Why auto passes pallas_gpu over: float32 when full-precision dots were asked for."""
    return tf32_reason(q)


def padded_length(t: int) -> int:
    """The length `pallas_attention` pads T to: a power of two from 32 up to the forward block,
    then a multiple of it, so that every forward and backward block divides it."""
    if t <= PALLAS_BLOCK:
        return max(PALLAS_BACKWARD_BLOCK, 1 << math.ceil(math.log2(t)))
    return -(-t // PALLAS_BLOCK) * PALLAS_BLOCK


def _mha():
    with warnings.catch_warnings():  # deprecated upstream in favour of tokamax; still shipped
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention
    return attention


def _flash(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
           causal: bool, scale: float) -> jax.Array:
    """One shard: repeat K / V to the query heads, pad T, run `mha`, cut and zero padding."""
    ops = _mha()
    b, t, hq, _ = q.shape
    groups = hq // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    pad = padded_length(t) - t
    seg = segment_ids
    if pad:
        if seg is None and not causal:  # keep the padding keys out of real rows
            seg = jnp.ones((b, t), jnp.int32)
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if seg is not None:
            seg = jnp.pad(seg, ((0, 0), (0, pad)))  # segment 0
    blocks = ops.BlockSizes(
        block_q=PALLAS_BLOCK, block_k=PALLAS_BLOCK, block_q_dkv=PALLAS_BACKWARD_BLOCK,
        block_kv_dkv=PALLAS_BACKWARD_BLOCK, block_q_dq=PALLAS_BACKWARD_BLOCK,
        block_kv_dq=PALLAS_BACKWARD_BLOCK,
    )
    out = ops.mha(q, k, v, seg, sm_scale=scale, causal=causal, block_sizes=blocks,
                  interpret=interpret())[:, :t]
    if segment_ids is not None:  # segment 0 sees nothing (the kernel lets it see itself)
        out = jnp.where((segment_ids != 0)[:, :, None, None], out, 0)
    return out


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     q_segment_ids: jax.Array | None = None, causal: bool = True,
                     scale: float | None = None, **_) -> jax.Array:
    """q [B, T, Hq, D], k / v [B, T, Hkv, D] -> [B, T, Hq, D] through Pallas GPU (module doc).
    Positions are not read: `pallas_supports` admits only calls where indices mask alike."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def run(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
        return _flash(q, k, v, seg, causal=causal, scale=scale)

    return shard_map_kernel(run, in_axes=(_QKV, _QKV, _QKV, _SEG), out_axes=_QKV,
                            unsplit=_unsplit())(q, k, v, q_segment_ids)


def _unsplit() -> tuple[str, ...]:
    """The sequence axis, where the active mesh has one: both kernels need whole sequences."""
    ctx = active()
    return ("sequence",) if ctx is not None and "sequence" in ctx[0].axis_names else ()
