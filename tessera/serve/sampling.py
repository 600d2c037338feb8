"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), min-p, seeded per row.

Logits are processed in float32 in this order: divide by the temperature, keep the top-k logits,
keep the smallest set of the remaining tokens whose probability reaches top-p, then drop tokens
whose probability is below ``min_p`` times the most likely one's. Ties at a cut-off are kept.
Temperature 0 is greedy (argmax) and skips the rest.

Every row draws from its own key, ``fold_in(fold_in(key(seed), row_id), position)``, so a
sequence's tokens depend on its seed, its index in the request and its positions, never on which
other prompts share its batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature=0`` is greedy; ``top_k=0``, ``top_p=1`` and
    ``min_p=0`` switch the respective filter off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def processing(self) -> tuple[float, int, float, float]:
        """What the compiled code depends on (everything but the seed): a static jit key."""
        if self.greedy:
            return (0.0, 0, 1.0, 0.0)
        return (float(self.temperature), int(self.top_k), float(self.top_p), float(self.min_p))

    @classmethod
    def from_config(cls, decode_cfg: Any, **overrides: Any) -> SamplingParams:
        """From ``config.decode``; ``overrides`` that are not None replace its values."""
        values = {f.name: decode_cfg[f.name] for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(
            temperature=float(values["temperature"]),
            top_k=int(values["top_k"]),
            top_p=float(values["top_p"]),
            min_p=float(values["min_p"]),
            seed=int(values["seed"]),
        )


def process_logits(
    logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> jax.Array:
    """logits [..., V] -> float32 logits [..., V] with filtered-out tokens at -inf.

    ``temperature`` must be > 0 here (greedy never reaches this function).
    """
    x = logits.astype(jnp.float32) / jnp.float32(temperature)
    neg_inf = jnp.float32(-jnp.inf)
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, neg_inf)
    if top_p < 1.0:
        probs = jax.nn.softmax(x, axis=-1)
        desc = -jnp.sort(-probs, axis=-1)
        mass_before = jnp.cumsum(desc, axis=-1) - desc
        # The most likely token is always kept; then every token while the mass before it < p.
        kept = (mass_before < top_p).at[..., 0].set(True)
        cutoff = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(probs >= cutoff, x, neg_inf)
    if min_p > 0.0:
        probs = jax.nn.softmax(x, axis=-1)
        floor = min_p * jnp.max(probs, axis=-1, keepdims=True)
        x = jnp.where(probs >= floor, x, neg_inf)
    return x


def row_keys(key: jax.Array, row_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Per-row keys [B, 2] from a base key (uint32 [2]), row ids [B] and positions [B]."""
    fold = lambda r, p: jax.random.fold_in(jax.random.fold_in(key, r), p)
    return jax.vmap(fold)(row_ids, positions)


def sample(
    logits: jax.Array,
    processing: tuple[float, int, float, float],
    key: jax.Array,
    row_ids: jax.Array,
    positions: jax.Array,
) -> jax.Array:
    """logits [B, V] -> int32 tokens [B] for the tokens at ``positions`` [B] of rows ``row_ids``.

    ``processing`` is ``SamplingParams.processing()``; ``key`` is ``jax.random.PRNGKey(seed)``.
    """
    temperature, top_k, top_p, min_p = processing
    if temperature == 0:
        return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    x = process_logits(logits, temperature, top_k, top_p, min_p)
    keys = row_keys(key, row_ids, positions)
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
