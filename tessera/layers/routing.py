"""Mixture-of-experts routing in plain jnp: scores, (group-limited) top-k, capacity, and the
router's auxiliary losses and statistics. Shapes: logits [..., E] float32; a token's k
assignments are ``ids`` int32 [..., k] with combine ``weights`` [..., k].

Routing (``route``), as Mixtral / Qwen-MoE / DeepSeek-V2 / V3 do it:
  scores  = softmax(logits) or sigmoid(logits)                         [..., E]
  choice  = scores + bias (DeepSeek-V3's correction bias; selection only)
  groups  (n_group > 1): experts in n_group contiguous groups, group score = the max of its
          choice scores ("max", V2's group_limited_greedy) or the sum of its top two
          ("top2_sum", V3's noaux_tc); experts outside the topk_group best groups are excluded
  ids     = top-k of choice (ties: the lower expert id)
  weights = scores at ids (no bias), / their sum if norm_topk_prob, * routed_scaling_factor
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tessera.kernels.moe.reference import rank_in_group

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


def scores_of(logits: jax.Array, score_func: str) -> jax.Array:
    """Router scores [..., E] (float32) from logits."""
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if score_func == "softmax" else jax.nn.sigmoid(logits)


def route(
    logits: jax.Array,
    *,
    k: int,
    score_func: str = "softmax",
    bias: jax.Array | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights float32 [..., k], ids int32 [..., k], scores float32 [..., E]); see the module
    docstring. ``bias`` [E] moves the choice, never the weights."""
    scores = scores_of(logits, score_func)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    e = scores.shape[-1]
    if n_group > 1 and topk_group < n_group:
        grouped = choice.reshape(*choice.shape[:-1], n_group, e // n_group)
        if group_score == "max":
            group = jnp.max(grouped, axis=-1)
        else:
            group = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        _, best = jax.lax.top_k(group, topk_group)
        eligible = jnp.sum(jax.nn.one_hot(best, n_group, dtype=jnp.int32), axis=-2) > 0
        eligible = jnp.repeat(eligible, e // n_group, axis=-1)
        choice = jnp.where(eligible, choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * routed_scaling_factor, ids.astype(jnp.int32), scores


def capacity(capacity_factor: float, length: int, k: int, num_experts: int) -> int:
    """Assignments an expert takes from one row of ``length`` tokens; 0: dropless."""
    if capacity_factor <= 0:
        return 0
    return math.ceil(capacity_factor * length * k / num_experts)


def capacity_keep(ids: jax.Array, eligible: jax.Array, num_experts: int, cap: int) -> jax.Array:
    """Which assignments fit: bool [B, T, k] for ids [B, T, k] and eligible [B, T] (padding
    takes no capacity). Priority within a row: every token's first choice in position order,
    then every second choice, ...; an expert keeps the first ``cap`` it is given."""
    b, t, k = ids.shape
    keys = jnp.where(eligible[..., None], ids, num_experts)
    _, rank = rank_in_group(jnp.swapaxes(keys, 1, 2).reshape(b, k * t))
    keep = (rank < cap).reshape(b, k, t)
    return jnp.swapaxes(keep, 1, 2) & eligible[..., None]


def expert_load(ids: jax.Array, real: jax.Array, num_experts: int) -> jax.Array:
    """Share of the real tokens' assignments each expert gets, float32 [E] (sums to 1; zeros
    when there are no real tokens). ids [..., k], real bool [...]."""
    real = jnp.broadcast_to(real[..., None], ids.shape).astype(jnp.float32)
    counts = jnp.zeros((num_experts,), jnp.float32).at[ids.reshape(-1)].add(real.reshape(-1))
    return counts / jnp.maximum(jnp.sum(counts), 1.0)


def balance_loss(load: jax.Array, scores: jax.Array, real: jax.Array) -> jax.Array:
    """Switch / Mixtral load-balancing loss ``E * sum_i f_i * P_i``: f = ``load`` (share of
    assignments, no gradient), P = the mean over real tokens of the scores normalised to sum 1
    per token (the softmax probabilities themselves). 1 when both are uniform."""
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    mask = real[..., None].astype(jnp.float32)
    mean = jnp.sum(probs * mask, axis=tuple(range(probs.ndim - 1))) / jnp.maximum(
        jnp.sum(mask), 1.0
    )
    return scores.shape[-1] * jnp.sum(jax.lax.stop_gradient(load) * mean)


def z_loss(logits: jax.Array, real: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: the mean over real tokens of logsumexp(logits)^2."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    mask = real.astype(jnp.float32)
    return jnp.sum(jnp.square(lse) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
