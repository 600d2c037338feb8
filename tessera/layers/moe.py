"""Mixture-of-experts channel mixer (Mixtral, Qwen2-MoE / Qwen3-MoE, DeepSeek-V2 / V3 routing).

``y = sum_k w_k * FFN_{e_k}(x) [+ gate(x) * shared(x)]``: a router picks k of E SwiGLU experts
per token (``layers/routing.py``), the experts run through the dispatch of ``kernels/moe``
(dropless sort + ``ragged_dot``, expert-parallel over the mesh's expert axis), and an optional
shared expert (an ordinary ``MLP``) sees every token. Config: ``model.moe`` (configs/base.py).

Parameters (the names the HF importers map to):
  router       [D, E]     ("embed", "experts_router")            float32 logits, param_dtype
  router_bias  [E]        ("experts_router",)     when moe.router_bias or bias_update_rate > 0;
                                                  float32; updated by rule, not by the optimizer
  wi_gate      [E, D, F]  ("experts", "embed", "expert_mlp")     F = moe.expert_dim
  wi_up        [E, D, F]  ("experts", "embed", "expert_mlp")
  wo           [E, F, D]  ("experts", "expert_mlp", "embed")
  shared/      an MLP (``wi_gate``, ``wi_up`` [D, Fs], ``wo`` [Fs, D]; SwiGLU, no biases) of width
               Fs = moe.shared_expert_dim, when moe.num_shared_experts > 0
  shared_gate  [D, 1]     ("embed", None)          when moe.shared_expert_gate (Qwen2-MoE)

Padding tokens (segment id 0) are not dispatched (their routed output is zero) and take no part
in the losses and statistics. Aux: ``moe_balance_loss`` (aux_loss_coef > 0), ``moe_z_loss``
(z_loss_coef > 0), and the statistics ``expert_load`` [E] (each expert's share of the real
tokens' assignments as chosen by the router, before any capacity drop, times E: 1 = balanced)
and ``dropped_fraction`` (share of the real tokens' assignments dropped by capacity; 0 when
dropless).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.kernels import moe as moe_kernels
from tessera.kernels.moe.parallel import dispatch
from tessera.layers import routing
from tessera.layers.base import RuleUpdate, cast, normal, param, zeros
from tessera.layers.mlp import MLP
from tessera.sharding import constrain

if TYPE_CHECKING:  # a runtime import would be circular: the mixers package registers MoE
    from tessera.layers.mixers.base import Aux, SeqInfo


def check_config(cfg: ConfigDict) -> None:
    """One-line ValueErrors naming the ``model.moe`` key at fault."""
    m = cfg.moe
    e, k = m.num_experts, m.num_experts_per_tok
    errors = [
        (m.score_func not in routing.SCORE_FUNCS,
         f"score_func: unknown {m.score_func!r}; known: {', '.join(routing.SCORE_FUNCS)}"),
        (e < 1, f"num_experts={e} must be positive"),
        (not 1 <= k <= e, f"num_experts_per_tok={k} must be between 1 and num_experts={e}"),
        (m.expert_dim < 1, f"expert_dim={m.expert_dim} must be positive"),
        (m.n_group < 1 or e % m.n_group,
         f"num_experts={e} is not divisible by n_group={m.n_group}"),
        (not 1 <= m.topk_group <= m.n_group,
         f"topk_group={m.topk_group} must be between 1 and n_group={m.n_group}"),
        (m.group_score not in routing.GROUP_SCORES,
         f"group_score: unknown {m.group_score!r}; known: {', '.join(routing.GROUP_SCORES)}"),
    ]
    for bad, message in errors:
        if bad:
            raise ValueError(f"model.moe.{message}")
    per_group = e // m.n_group
    if m.n_group > 1 and k > m.topk_group * per_group:
        raise ValueError(
            f"model.moe.num_experts_per_tok={k} exceeds the {m.topk_group * per_group} experts "
            f"of topk_group={m.topk_group} groups of {per_group}"
        )
    if m.n_group > 1 and m.group_score == "top2_sum" and per_group < 2:
        raise ValueError(f"model.moe.group_score=top2_sum needs 2 or more experts per group, "
                         f"got num_experts={e} / n_group={m.n_group}")
    if m.num_shared_experts < 0 or (m.num_shared_experts > 0 and m.shared_expert_dim < 1):
        raise ValueError(
            f"model.moe.shared_expert_dim={m.shared_expert_dim} must be positive with "
            f"num_shared_experts={m.num_shared_experts} (0: no shared expert)"
        )
    if m.shared_expert_gate and m.num_shared_experts == 0:
        raise ValueError(
            "model.moe.shared_expert_gate needs a shared expert (num_shared_experts > 0)"
        )
    for key in ("capacity_factor", "bias_update_rate", "aux_loss_coef", "z_loss_coef"):
        if m[key] < 0:
            raise ValueError(f"model.moe.{key}={m[key]} must be >= 0")
    if m.impl not in moe_kernels.IMPLS:
        known = ", ".join(moe_kernels.IMPLS)
        raise ValueError(f"model.moe.impl: unknown {m.impl!r}; known: {known}")


def balance_bias(cfg: ConfigDict, bias: jax.Array, load: jax.Array) -> jax.Array:
    """DeepSeek-V3's auxiliary-loss-free balancing: ``bias_i += rate * sign(mean load -
    load_i)`` (rate ``moe.bias_update_rate``; 0 keeps a checkpoint's bias as it is)."""
    rate = float(cfg.moe.bias_update_rate)
    step = jnp.sign(jnp.mean(load) - load)
    return (bias + rate * step).astype(bias.dtype)


class MoE(nnx.Module):
    """[B, T, D] -> ([B, T, D], aux) through k of E routed SwiGLU experts (module docstring)."""

    REMAT_SAVED = ("moe_out",)
    LOGICAL_RULES: dict[str, tuple[str, ...]] = {
        "experts": ("expert",),
        "expert_mlp": ("tensor",),
        "experts_router": (),
    }
    AUX_STATS = ("expert_load", "dropped_fraction")
    RULE_UPDATES = (RuleUpdate("router_bias", "expert_load", balance_bias),)

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        check_config(cfg)
        m = cfg.moe
        d, e, f, pd = cfg.d_model, m.num_experts, m.expert_dim, cfg.param_dtype
        init = normal(cfg.init_std)
        self.dtype = jnp.dtype(cfg.dtype)
        self.k = int(m.num_experts_per_tok)
        self.num_experts = int(e)
        self.route_args = dict(
            k=self.k, score_func=m.score_func, n_group=int(m.n_group),
            topk_group=int(m.topk_group), group_score=m.group_score,
            norm_topk_prob=bool(m.norm_topk_prob),
            routed_scaling_factor=float(m.routed_scaling_factor),
        )
        self.capacity_factor = float(m.capacity_factor)
        self.aux_loss_coef, self.z_loss_coef = float(m.aux_loss_coef), float(m.z_loss_coef)
        self.impl = m.impl
        self.router = param(rngs, init, (d, e), ("embed", "experts_router"), pd)
        with_bias = bool(m.router_bias) or m.bias_update_rate > 0
        self.router_bias = (
            param(rngs, zeros, (e,), ("experts_router",), "float32") if with_bias else None
        )
        self.wi_gate = param(rngs, init, (e, d, f), ("experts", "embed", "expert_mlp"), pd)
        self.wi_up = param(rngs, init, (e, d, f), ("experts", "embed", "expert_mlp"), pd)
        self.wo = param(rngs, init, (e, f, d), ("experts", "expert_mlp", "embed"), pd)
        self.shared = MLP(shared_config(cfg), rngs=rngs) if m.num_shared_experts > 0 else None
        self.shared_gate = (
            param(rngs, init, (d, 1), ("embed", None), pd) if m.shared_expert_gate else None
        )

    def __call__(self, x: jax.Array, info: SeqInfo | None = None) -> tuple[jax.Array, Aux]:
        b, t, _ = x.shape
        x = x.astype(self.dtype)
        real = jnp.ones((b, t), bool) if info is None else info.segment_ids > 0
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), cast(self.router, jnp.float32))
        bias = None if self.router_bias is None else self.router_bias[...]
        weights, ids, scores = routing.route(logits, bias=bias, **self.route_args)
        cap = routing.capacity(self.capacity_factor, t, self.k, self.num_experts)
        if cap:
            keep = routing.capacity_keep(ids, real, self.num_experts, cap)
        else:
            keep = jnp.broadcast_to(real[..., None], ids.shape)
        y = dispatch(
            x, jnp.where(keep, ids, self.num_experts), weights,
            cast(self.wi_gate, self.dtype), cast(self.wi_up, self.dtype), cast(self.wo, self.dtype),
            capacity=cap, impl=self.impl,
        )
        if self.shared is not None:
            shared, _ = self.shared(x)
            if self.shared_gate is not None:
                gate = jnp.einsum("btd,do->bto", x, cast(self.shared_gate, self.dtype))
                shared = shared * jax.nn.sigmoid(gate)
            y = y + shared
        y = checkpoint_name(constrain(y, ("batch", "length", "act_embed")), "moe_out")
        return y, self._aux(logits, ids, scores, real, keep)

    def _aux(
        self, logits: jax.Array, ids: jax.Array, scores: jax.Array, real: jax.Array,
        keep: jax.Array,
    ) -> Aux:
        load = routing.expert_load(ids, real, self.num_experts)
        assigned = jnp.maximum(jnp.sum(real) * self.k, 1)
        dropped = jnp.sum(real[..., None] & ~keep) / assigned
        aux = {"expert_load": load * self.num_experts, "dropped_fraction": dropped}
        if self.aux_loss_coef:
            aux["moe_balance_loss"] = self.aux_loss_coef * routing.balance_loss(load, scores, real)
        if self.z_loss_coef:
            aux["moe_z_loss"] = self.z_loss_coef * routing.z_loss(logits, real)
        return aux

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        """Active FLOPs only: the router, k experts, the shared expert and its gate."""
        del seq_len
        m, d = cfg.moe, cfg.d_model
        flops = 2 * d * m.num_experts + m.num_experts_per_tok * 6 * d * m.expert_dim
        if m.num_shared_experts > 0:
            flops += 6 * d * m.shared_expert_dim + (2 * d if m.shared_expert_gate else 0)
        return flops

    @staticmethod
    def check_mesh(cfg: ConfigDict, sizes: dict[str, int], rules: dict) -> None:
        """Expert parallelism needs whole experts per shard."""
        from tessera.kernels.moe.parallel import expert_axes

        axes = expert_axes(rules, sizes)
        shards = math.prod(sizes[a] for a in axes)
        if cfg.moe.num_experts % shards:
            names = " x ".join(f"mesh.{a}={sizes[a]}" for a in axes)
            raise ValueError(
                f"model.moe.num_experts={cfg.moe.num_experts} is not divisible by the expert "
                f"axis of the mesh ({names})"
            )


def shared_config(cfg: ConfigDict) -> ml_collections.FrozenConfigDict:
    """The shared expert's MLP config: SwiGLU of width ``moe.shared_expert_dim``, no biases."""
    return ml_collections.FrozenConfigDict(
        dict(
            d_model=cfg.d_model, mlp_dim=cfg.moe.shared_expert_dim, mlp_activation="swiglu",
            mlp_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=cfg.init_std,
        )
    )
