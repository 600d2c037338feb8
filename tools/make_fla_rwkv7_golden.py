"""Golden file for the RWKV-7 layers: fla's ``RWKV7Attention`` and ``RWKV7FeedForward`` on CPU.

fla's layers call triton kernels; this swaps each for fla's own torch reference of it (the
``*_ref`` functions next to the kernels, ``token_shift_ref`` and the naive DPLR recurrence
``dplr_recurrence`` for ``chunk_rwkv7``), then runs, with every parameter drawn at random (so
that no zero-initialised projection hides a term), on x [B, T, D]:

  layer 0 (first layer, stores v_first) and layer 1 (value residual against a given v_first)
  of the time mix, and the channel mix. It writes ``tests/fixtures/fla/rwkv7_layers.npz``:

  attn.<fla name>        float32, fla's layout (``model.layers.{i}.attn.*`` without the prefix;
                         layer 1's parameters; layer 0 shares them, without v_lora)
  ffn.<fla name>         float32, ``model.layers.{i}.ffn.*``
  x [B, T, D], v_first [B, T, D]  inputs; attn0_out, attn0_v_first, attn1_out, ffn_out [B, T, D]

Shapes: D = 16, head_dim 8, LoRA ranks 4 (decay, a, gate) and 2 (v), FFN width 32, norm_eps
1e-5. Set up the side virtualenv of ``tools/make_fla_delta_golden.py``, then
``/tmp/hfvenv/bin/python tools/make_fla_rwkv7_golden.py``. Seeds are fixed.
"""

from __future__ import annotations

import pathlib
import warnings

import fla.layers.rwkv7 as fla_rwkv7
import fla.models.rwkv7.modeling_rwkv7 as fla_model
import numpy as np
import torch
from fla.modules.token_shift import token_shift_ref
from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
from fla.ops.rwkv7.fused_k_update import k_update_ref
from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

OUT = (
    pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "fla" / "rwkv7_layers.npz"
)
B, T, D, HEAD, FFN = 2, 7, 16, 8, 32


def token_shift(x, cu_seqlens=None, output_cache=False, cache=None):
    """fla's token_shift (delta = x_prev - x, and the last x as the cache) via its reference."""
    assert cu_seqlens is None and cache is None
    delta = token_shift_ref(x)
    return (delta, x[:, -1]) if output_cache else delta


def chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, **kw):
    """chunk_rwkv7 ([B, T, H, K] layout) through the naive recurrence (which scales q by
    K^-1/2: undone here)."""
    heads_first = lambda z: z.transpose(1, 2)  # noqa: E731
    q = heads_first(r) * (r.shape[-1] ** 0.5 * scale)
    o, state = dplr_recurrence(q, *map(heads_first, (k, v, a, b, w)), initial_state=initial_state)
    return heads_first(o), state


def main() -> None:
    warnings.simplefilter("ignore")
    fla_rwkv7.token_shift = fla_model.token_shift = token_shift
    fla_rwkv7.fused_addcmul_rwkv7 = torch_addcmul_rwkv7
    fla_rwkv7.fused_k_rwkv7 = k_update_ref
    fla_rwkv7.gate_output_correction = gate_output_correction_ref
    fla_rwkv7.chunk_rwkv7 = chunk_rwkv7
    torch.manual_seed(0)
    common = dict(
        hidden_size=D,
        head_dim=HEAD,
        decay_low_rank_dim=4,
        gate_low_rank_dim=4,
        a_low_rank_dim=4,
        v_low_rank_dim=2,
        norm_eps=1e-5,
        num_hidden_layers=2,
    )
    attn1 = fla_rwkv7.RWKV7Attention(layer_idx=1, **common)
    attn0 = fla_rwkv7.RWKV7Attention(layer_idx=0, **common)
    ffn = fla_model.RWKV7FeedForward(D, intermediate_size=FFN, layer_idx=1, num_hidden_layers=2)
    gen = torch.Generator().manual_seed(1)
    out = {}
    with torch.no_grad():
        for prefix, module in (("attn", attn1), ("ffn", ffn)):
            for name, p in module.named_parameters():
                fan_in = p.shape[-1] if p.ndim == 2 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
                if name in ("g_norm.weight", "k_a"):
                    p.add_(1.0)
                out[f"{prefix}.{name}"] = p.numpy().copy()
        attn0.load_state_dict(
            {k: v for k, v in attn1.state_dict().items() if not k.startswith("v_lora")}
        )
        x = torch.randn(B, T, D, generator=gen)
        v_first = torch.randn(B, T, D, generator=gen)
        attn0_out, _, _, attn0_v_first = attn0(x)
        attn1_out, _, _, _ = attn1(x, v_first=v_first)
        ffn_out, _ = ffn(x)
    out.update(
        x=x,
        v_first=v_first,
        attn0_out=attn0_out,
        attn0_v_first=attn0_v_first,
        attn1_out=attn1_out,
        ffn_out=ffn_out,
    )
    out = {k: np.asarray(v, np.float32) for k, v in out.items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
