"""Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers"):
``model.name = "dit"``, diffusers' ``DiTTransformer2DModel``.

``DiT(cfg, rngs=)``; ``model(x [B, S, S, C] float, t [B], *, labels [B] int, context=None) ->
float32 [B, S, S, C_out]`` with S = ``image_size`` (the latent side), C = ``num_channels``,
C_out = C (``dit.learn_sigma``: 2 C, the noise prediction then the variance interpolation).

The latents are cut into ``patch_size`` patches (``layers/vision.py: PatchEmbed``) plus fixed 2-D
sin-cos positions (diffusers' ``get_2d_sincos_pos_embed``: ``sincos_2d(endpoint=False)``). The
conditioning c [B, D] is the timestep MLP of ``timestep_embedding(t, dit.freq_dim,
flip_sin_to_cos=True, freq_shift=1)`` plus a row of the class table [K + 1, D]; row K is the
null class that classifier-free guidance pairs with every label (label dropout in training is
the diffusion task's, ``model.diffusion.cond_dropout``). Labels outside [0, K] give NaN outputs
(a traced value cannot raise).

Each block is adaLN-Zero: ``adaln(silu(c))`` gives shift / scale / gate for the attention and
the MLP branch (zero-initialised, so every block starts as the identity); the branch input is
the non-affine LayerNorm of x times ``1 + scale`` plus ``shift``, its output is multiplied by
``gate`` before the residual. Attention is tessera's (``layers/mixers/attention.py``:
bidirectional, no RoPE, biases everywhere), the MLP tessera's (tanh-GELU with biases). The final
layer modulates a non-affine LayerNorm by ``final_adaln(silu(c))`` (shift, scale), projects each
token to a p x p x C_out patch (``proj_out``, zero-initialised) and unpatchifies.

LayerNorm eps: 1e-6 before attention and at the output (fixed, as diffusers), ``model.norm_eps``
before the MLP (diffusers' ``norm_eps``; 1e-6 in the paper's code, 1e-5 diffusers' default).

Blocks are stacked like the LM's (``models/stack.py``): one ``units`` entry per layer holding
``blocks/0``, scanned with ``nnx.scan`` over a leading ``layers`` axis (``scan_layers``) or
unrolled, each under the ``model.remat`` policy. ``rng`` / ``train`` are the denoiser
interface's; DiT has no training noise of its own.

Parameter tree (N = (S / p)^2 tokens, D = d_model, H = num_heads, Dh = head_dim, F = mlp_dim,
Fq = dit.freq_dim, K = num_classes; scanned leaves under ``units`` lead with num_layers,
unrolled ones are ``units/<layer>/blocks/0/...``)::

    patch_embed/kernel, bias           [p, p, C, D], [D]      diffusers pos_embed.proj
    t_embedder/linear_1/kernel, bias   [Fq, D], [D]           norm1.emb.timestep_embedder
    t_embedder/linear_2/kernel, bias   [D, D], [D]              (every block holds a copy)
    label_embedding                    [K + 1, D]             norm1.emb.class_embedder
    units/blocks/0/adaln/kernel, bias  [D, 6 D], [6 D]        norm1.linear
    units/blocks/0/attention/wq, wk, wv, bq, bk, bv, wo, bo   attn1.to_q, to_k, to_v, to_out.0
    units/blocks/0/mlp/wi, bi, wo, bo  [D, F], [F], [F, D], [D]  ff.net.0.proj, ff.net.2
    final_adaln/kernel, bias           [D, 2 D], [2 D]        proj_out_1
    proj_out/kernel, bias              [D, p p C_out], [p p C_out]  proj_out_2
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tessera.configs.base import ConfigDict
from tessera.layers.base import normal, param
from tessera.layers.conv import Dense
from tessera.layers.diffusion import TimestepMLP, timestep_embedding
from tessera.layers.mixers import Attention, SeqInfo
from tessera.layers.mlp import MLP
from tessera.layers.vision import PatchEmbed, sincos_2d
from tessera.models.remat import remat_policy
from tessera.sharding import constrain

# The paper's sizes (Table 1): width, depth, heads (head width = width / heads, MLP 4 x width),
# each with patches of 2, 4 or 8 ("DiT-XL/2": 1152 wide, 28 deep, 16 heads, 2 x 2 patches).
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
PATCH_SIZES = (2, 4, 8)
MODULATION_EPS = 1e-6  # the LayerNorm before attention and the final one (diffusers fixes it)
TOKENS = ("batch", "length", "act_embed")


def _check_config(cfg: ConfigDict) -> None:
    """One-line ValueErrors for dit settings that cannot work."""
    s, p = cfg.image_size, cfg.patch_size
    if s <= 0 or p <= 0 or s % p:
        raise ValueError(f"model.image_size={s} is not divisible by model.patch_size={p}")
    if cfg.num_classes <= 0:
        raise ValueError(f"dit needs model.num_classes > 0 (class-conditional), got "
                         f"{cfg.num_classes}")
    if cfg.num_channels <= 0:
        raise ValueError(f"dit needs model.num_channels > 0, got {cfg.num_channels}")
    if cfg.num_layers <= 0:
        raise ValueError(f"dit needs model.num_layers > 0, got {cfg.num_layers}")
    if cfg.dit.freq_dim <= 2 or cfg.dit.freq_dim % 2:
        raise ValueError(f"model.dit.freq_dim={cfg.dit.freq_dim} must be even and > 2")


def size_fields(name: str) -> dict[str, int]:
    """``model`` fields of the paper's size ``name`` ("S/2" ... "XL/8"): d_model, num_layers,
    num_heads, num_kv_heads, head_dim, mlp_dim, patch_size."""
    size, _, patch = name.partition("/")
    if size not in SIZES or patch not in tuple(map(str, PATCH_SIZES)):
        raise ValueError(f"unknown DiT size {name!r}; known: {', '.join(SIZES)} each with "
                         f"/{', /'.join(map(str, PATCH_SIZES))} (e.g. 'XL/2')")
    d, layers, heads = SIZES[size]
    return dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                head_dim=d // heads, mlp_dim=4 * d, patch_size=int(patch))


def block_config(cfg: ConfigDict) -> ml_collections.FrozenConfigDict:
    """The config DiT builds tessera's attention and MLP with: bidirectional multi-head
    attention without RoPE or q/k norms, biases on every projection, a tanh-GELU MLP."""
    derived = ml_collections.ConfigDict(cfg.to_dict())
    derived.update(
        num_kv_heads=cfg.num_heads, causal=False, rope=False, qk_norm=False, sliding_window=0,
        qkv_bias=True, attn_out_bias=True, mlp_activation="gelu_tanh", mlp_bias=True,
    )
    return ml_collections.FrozenConfigDict(derived)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """adaLN: the non-affine LayerNorm of x [B, N, D] (statistics in float32) times
    ``1 + scale`` plus ``shift`` ([B, 1, D]), in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)).astype(x.dtype)


class DiTBlock(nnx.Module):
    """One adaLN-Zero block (module docstring): x [B, N, D], silu(c) [B, D] -> x [B, N, D]."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.norm_eps = float(cfg.norm_eps)
        self.adaln = Dense(
            d, 6 * d, axes=("embed", "mlp"), zero_init=True, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, rngs=rngs,
        )
        self.attention = Attention(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cond: jax.Array, info: SeqInfo) -> jax.Array:
        mods = jnp.split(self.adaln(cond)[:, None, :], 6, axis=-1)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = mods
        h, _, _ = self.attention(modulate(x, shift_attn, scale_attn, MODULATION_EPS), info)
        x = x + gate_attn * h
        h, _ = self.mlp(modulate(x, shift_mlp, scale_mlp, self.norm_eps))
        return constrain(x + gate_mlp * h, TOKENS)


class DiTUnit(nnx.Module):
    """One layer of the stack, ``blocks/0``: the LM stack's parameter layout
    (``units/blocks/<j>``), which the converter's layer placement (convert/params.py) reads."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([DiTBlock(cfg, rngs=rngs)])

    def __call__(self, x: jax.Array, cond: jax.Array, info: SeqInfo) -> jax.Array:
        return self.blocks[0](x, cond, info)


class DiT(nnx.Module):
    """Class-conditional diffusion transformer (see the module docstring)."""

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # later edits of the caller's config stay out
        _check_config(cfg)
        self.cfg = cfg
        d, p, pd = cfg.d_model, cfg.patch_size, cfg.param_dtype
        self.grid = cfg.image_size // p
        self.out_channels = cfg.num_channels * (2 if cfg.dit.learn_sigma else 1)
        sincos_2d(self.grid, self.grid, d, endpoint=False)  # its errors at construction
        kw = dict(dtype=cfg.dtype, param_dtype=pd, rngs=rngs)
        self.patch_embed = PatchEmbed(p, cfg.num_channels, d, **kw)
        self.t_embedder = TimestepMLP(cfg.dit.freq_dim, d, **kw)
        self.label_embedding = param(
            rngs, normal(cfg.init_std), (cfg.num_classes + 1, d), (None, "embed"), pd
        )
        block_cfg = block_config(cfg)
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r: nnx.Rngs) -> DiTUnit:
                return DiTUnit(block_cfg, rngs=r)

            self.units = make(rngs)
        else:
            self.units = nnx.List([DiTUnit(block_cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_adaln = Dense(d, 2 * d, axes=("embed", "mlp"), zero_init=True, **kw)
        self.proj_out = Dense(d, p * p * self.out_channels, axes=("embed", None), zero_init=True,
                              **kw)

    def _check_inputs(
        self, x: jax.Array, t: jax.Array, labels: jax.Array, context: jax.Array | None
    ) -> None:
        s, c = self.cfg.image_size, self.cfg.num_channels
        if context is not None:
            raise ValueError("dit is class-conditional: context must be None (pass labels)")
        if x.ndim != 4 or x.shape[1:] != (s, s, c):
            raise ValueError(f"dit expects x [batch, {s}, {s}, {c}] (model.image_size, "
                             f"model.num_channels); got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"dit expects float x (latents); got {x.dtype}")
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"dit expects timesteps t [{b}] (one per example); got shape "
                             f"{tuple(t.shape)}")
        if labels.shape != (b,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"dit expects integer labels [{b}] in [0, {self.cfg.num_classes}] "
                             f"({self.cfg.num_classes}: the null class); got {labels.dtype} "
                             f"{tuple(labels.shape)}")

    def conditioning(self, t: jax.Array, labels: jax.Array) -> jax.Array:
        """Timesteps [B] and labels [B] -> c [B, D]: timestep MLP plus class row (NaN rows for
        labels outside [0, num_classes])."""
        feats = timestep_embedding(t, self.cfg.dit.freq_dim, flip_sin_to_cos=True, freq_shift=1)
        t_emb = self.t_embedder(feats)
        table = self.label_embedding[...].astype(t_emb.dtype)
        return t_emb + jnp.take(table, labels, axis=0, mode="fill", fill_value=jnp.nan)

    def _run_blocks(self, x: jax.Array, cond: jax.Array, info: SeqInfo) -> jax.Array:
        """The stack, scanned or unrolled, each layer under the ``model.remat`` policy."""
        policy = remat_policy(self.cfg.remat)
        scanned = self.cfg.scan_layers

        def body(unit: DiTUnit, x: jax.Array, cond: jax.Array, info: SeqInfo) -> jax.Array:
            return unit(x, cond, info)

        if policy is not None:
            body = nnx.remat(body, policy=policy, prevent_cse=not scanned)
        if scanned:
            scan = nnx.scan(body, in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry)
            return scan(self.units, x, cond, info)
        for unit in self.units:
            x = body(unit, x, cond, info)
        return x

    def unpatchify(self, tokens: jax.Array) -> jax.Array:
        """[B, N, p * p * C_out] (each token's patch row-major, channels last) ->
        [B, S, S, C_out]."""
        b, g, p = tokens.shape[0], self.grid, self.cfg.patch_size
        x = tokens.reshape(b, g, g, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * p, g * p, self.out_channels)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        labels: jax.Array,
        context: jax.Array | None = None,
        rng: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """x float [B, S, S, C], t [B] (int or float timesteps), labels int [B] (num_classes:
        the null class) -> float32 [B, S, S, C_out]. ``context`` must be None; ``rng`` and
        ``train`` are accepted for the denoiser interface (DiT has no training noise)."""
        del rng, train
        t, labels = jnp.asarray(t), jnp.asarray(labels)
        self._check_inputs(x, t, labels, context)
        h = self.patch_embed(x)
        pos = sincos_2d(self.grid, self.grid, h.shape[-1], endpoint=False)
        h = constrain(h + jnp.asarray(pos, h.dtype), TOKENS)
        cond = jax.nn.silu(self.conditioning(t, labels))
        b, n, _ = h.shape
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        h = self._run_blocks(h, cond, SeqInfo(positions, jnp.ones((b, n), jnp.int32)))
        shift, scale = jnp.split(self.final_adaln(cond)[:, None, :], 2, axis=-1)
        h = self.proj_out(modulate(h, shift, scale, MODULATION_EPS))
        return self.unpatchify(h).astype(jnp.float32)


def flops_per_example(cfg: ConfigDict) -> float:
    """Forward FLOPs of one example (2 per multiply-add; matmuls only): patch embedding, each
    block's adaLN projection, attention (q/k/v/o and the full N x N scores and values) and MLP,
    the timestep MLP, the final modulation and projection. Elementwise work (norms, softmax,
    GELU) is left out. The DiT paper's "Gflops" count multiply-adds, half of this."""
    p, d, layers = cfg.patch_size, cfg.d_model, cfg.num_layers
    n = (cfg.image_size // p) ** 2
    out = p * p * cfg.num_channels * (2 if cfg.dit.learn_sigma else 1)
    block = block_config(cfg)
    per_token = (
        2 * p * p * cfg.num_channels * d
        + layers * (Attention.flops_per_token(block, n) + MLP.flops_per_token(block, n))
        + 2 * d * out
    )
    conditioning = 2 * (cfg.dit.freq_dim * d + d * d) + 2 * layers * d * 6 * d + 2 * d * 2 * d
    return float(n * per_token + conditioning)

