"""RetNet multi-scale retention (Sun et al. 2023) as flash-linear-attention implements it.

Semantics follow fla's ``MultiScaleRetention`` with the defaults its ``RetNetConfig`` builds
(no short conv, no feature map, output gate with swish, affine norm, MHA) so ``RetNetForCausalLM``
weights load by renaming and transposing. Sizes: H = num_heads heads, key width
Kd = expand_k * d_model (K = Kd / H per head), value width Vd = expand_v * d_model (V = Vd / H).

  q, k    = x q_proj, x k_proj              [B, T, H, K], rotated by RoPE (below)
  v, gate = x v_proj, x g_proj              [B, T, H, V]
  S_t     = gamma_h S_{t-1} + k_t^T v_t     per head, gamma_h = 1 - 2^(-5 - h), h = 0..H-1
  o_t     = K^-0.5 q_t S_t
  y       = (rmsnorm_V(o) * g_norm_weight * silu(gate)) o_proj

The decay is fla's ``chunk_retention`` (``g_gamma = log(1 - 2^(-5 - arange(H)))``): fixed,
not learned. The norm is fla's ``FusedRMSNormGated(head_v_dim, eps=norm_eps)``: RMS over each
head's V channels (float32), one weight of V shared by the heads, then times ``gate *
sigmoid(gate)``. RetNetConfig's norm_eps (1e-6) reaches it, not the layer's own default 1e-5.

Rotary: fla's ``RotaryEmbedding(dim=K)``, base 10000, non-interleaved (rotate_half) over the
whole key head: the convention of ``layers/positions.apply_rope``, used here with
``model.rope_theta`` and no scaling (``model.rope_scaling`` is ignored: fla has none, and a
length-dependent scaling would disagree with keys already folded into the state). fla caches
cos/sin in the input dtype; here they are float32. The paper's xPos is not used (nor by fla).

Parameters (ours <- fla ``model.layers.{i}.attn.*``; torch Linear weights are [out, in]):
  q_proj         [D, H, K]  <- q_proj.weight.T.reshape(D, H, K)
  k_proj         [D, H, K]  <- k_proj.weight.T.reshape(D, H, K)
  v_proj         [D, H, V]  <- v_proj.weight.T.reshape(D, H, V)
  g_proj         [D, H, V]  <- g_proj.weight.T.reshape(D, H, V)
  g_norm_weight  [V]        <- g_norm_swish_gate.weight
  o_proj         [H, V, D]  <- o_proj.weight.T.reshape(H, V, D)
(fla splits its projections head-major, ``'(h d)'``, so a plain reshape is the head split.)
The rest of fla's model maps onto the LM's (block i = layer i of ``units/blocks/0``, stacked):
  norm1/scale, norm2/scale  <- layers.{i}.attn_norm.weight, layers.{i}.mlp_norm.weight
  channel/wi_gate, wi_up    <- layers.{i}.mlp.gate_proj.weight.T, mlp.up_proj.weight.T
  channel/wo                <- layers.{i}.mlp.down_proj.weight.T
  embed/embedding, final_norm/scale, head/kernel <- embeddings.weight, norm.weight,
                               lm_head.weight.T (fla's tie_word_embeddings defaults to False)
fla's ``GatedMLP`` is tessera's ``mlp`` with ``mlp_activation="swiglu"`` (silu(gate) * up), width
intermediate_size or, unset, 256 * ceil(int(D * hidden_ratio * 2 / 3) / 256)
(``configs/retnet.fla_mlp_dim``); every norm's eps is RetNetConfig.norm_eps. Init as fla's
``_init_weights``: every projection N(0, init_std = initializer_range 0.02), norm weights one.

Packed rows: rotary uses ``info.positions`` (restarting per document); the state is reset before
each document's first token (``recurrent.document_starts``). Padding (segment id 0) has k = v = 0
and log-decay 0, so it never moves the state, and a cache keeps the state after each row's last
real token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.kernels.gla import gla
from tessera.layers.base import cast, normal, ones, param
from tessera.layers.mixers.base import Aux, SeqInfo
from tessera.layers.mixers.recurrent import document_starts
from tessera.layers.positions import apply_rope, rope_frequencies
from tessera.sharding import constrain

F32 = jnp.float32


def _widths(cfg: ConfigDict) -> tuple[int, int, int]:
    """(H, K, V): heads and the per-head key / value widths; errors name the config keys."""
    r, d, h = cfg.retention, cfg.d_model, cfg.num_heads
    widths = []
    for name in ("expand_k", "expand_v"):
        width = d * float(r[name])
        if not math.isclose(width, round(width)) or round(width) % h:
            raise ValueError(
                f"model.retention.{name}: d_model * {name} = {width:g} must be an integer "
                f"multiple of num_heads={h}"
            )
        widths.append(round(width) // h)
    return h, widths[0], widths[1]


def decay_log(num_heads: int) -> jax.Array:
    """float32 [H]: log gamma_h = log(1 - 2^(-5 - h)), RetNet's fixed per-head decay."""
    return jnp.log1p(-jnp.exp2(-5.0 - jnp.arange(num_heads, dtype=F32)))


class Retention(nnx.Module):
    """[B, T, D] -> [B, T, D]; cache {"retention": [B, H, K, V] float32}, the same size for any
    length."""

    REMAT_SAVED = ("retention_proj", "retention_out")
    LOGICAL_RULES = {"cache_retention_heads": ("tensor",)}

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        h, k, v = _widths(cfg)
        d, pd = cfg.d_model, cfg.param_dtype
        self.num_heads, self.key_dim, self.value_dim = h, k, v
        self.dtype = jnp.dtype(cfg.dtype)
        self.eps = float(cfg.norm_eps)
        self.chunk_size, self.impl = int(cfg.retention.chunk_size), cfg.retention.impl
        self.rope_theta = float(cfg.rope_theta)
        init = normal(cfg.init_std)
        self.q_proj = param(rngs, init, (d, h, k), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, init, (d, h, k), ("embed", "heads", "head_dim"), pd)
        self.v_proj = param(rngs, init, (d, h, v), ("embed", "heads", "head_dim"), pd)
        self.g_proj = param(rngs, init, (d, h, v), ("embed", "heads", "head_dim"), pd)
        self.g_norm_weight = param(rngs, ones, (v,), ("head_dim",), pd)
        self.o_proj = param(rngs, init, (h, v, d), ("heads", "head_dim", "embed"), pd)

    def _project(self, x: jax.Array, w: nnx.Param) -> jax.Array:
        y = jnp.einsum("btd,dhk->bthk", x, cast(w, self.dtype))
        y = constrain(y, ("batch", "length", "act_heads", None))
        return checkpoint_name(y, "retention_proj")

    def _gated_norm(self, o: jax.Array, gate: jax.Array) -> jax.Array:
        """rmsnorm over each head's V channels, times g_norm_weight and silu(gate); float32
        math, result in the compute dtype. o [B, T, H, V], gate [B, T, H, V]."""
        of = o.astype(F32)
        of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + self.eps)
        of = of * self.g_norm_weight[...].astype(F32) * jax.nn.silu(gate.astype(F32))
        return of.astype(self.dtype)

    def __call__(
        self, x: jax.Array, info: SeqInfo, cache: dict | None = None
    ) -> tuple[jax.Array, dict | None, Aux]:
        real = (info.segment_ids > 0)[..., None, None]
        q = self._project(x, self.q_proj)
        k = self._project(x, self.k_proj)
        v = jnp.where(real, self._project(x, self.v_proj), 0)
        gate = self._project(x, self.g_proj)
        inv_freq, _ = rope_frequencies(self.key_dim, theta=self.rope_theta, max_position=0)
        q = apply_rope(q, info.positions, inv_freq)
        k = jnp.where(real, apply_rope(k, info.positions, inv_freq), 0)
        g = jnp.where(real[..., 0], decay_log(self.num_heads), 0.0)
        cached = cache is not None
        o, state = gla(
            q.astype(F32),
            k.astype(F32),
            v.astype(F32),
            g,
            h0=cache["retention"] if cached else None,
            reset=document_starts(info, cached),
            scale=self.key_dim**-0.5,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        o = constrain(o, ("batch", "length", "act_heads", None))
        y = jnp.einsum("bthv,hvd->btd", self._gated_norm(o, gate), cast(self.o_proj, self.dtype))
        y = checkpoint_name(constrain(y, ("batch", "length", "act_embed")), "retention_out")
        return y, ({"retention": state} if cached else None), {}

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        """The q/k/v/gate and output projections, and the chunked retention as executed: within
        a chunk of L = min(chunk_size, seq_len) tokens the q.k scores and the weighted sum of
        values over the whole L x L block, plus each token's query against the incoming chunk
        state and its key/value outer product into the outgoing one."""
        h, k, v = _widths(cfg)
        d = cfg.d_model
        proj = 2 * d * h * (2 * k + 2 * v) + 2 * h * v * d
        chunk = min(int(cfg.retention.chunk_size), seq_len)
        return proj + 2 * chunk * h * (k + v) + 2 * 2 * h * k * v

    @staticmethod
    def init_cache(cfg: ConfigDict, batch: int, length: int, dtype: jnp.dtype) -> dict:
        """Retention state [B, H, K, V] float32, the same for any ``length`` and ``dtype``."""
        del length, dtype
        h, k, v = _widths(cfg)
        return {"retention": jnp.zeros((batch, h, k, v), F32)}

    @staticmethod
    def cache_axes() -> dict:
        return {"retention": ("cache_batch", "cache_retention_heads", "head_dim", "head_dim")}
