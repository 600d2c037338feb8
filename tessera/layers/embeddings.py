"""Token embedding, the LM head (tied to the embedding or separate) and the classifier head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tessera.kernels.dense import dense
from tessera.layers.base import cast, normal, param, zeros
from tessera.sharding import constrain


class Embed(nnx.Module):
    """Token ids [B, T] -> vectors [B, T, D]; ``attend`` maps [B, T, D] -> logits [B, T, V]."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        init_std: float,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs,
    ):
        self.vocab_size = vocab_size
        self.dtype = jnp.dtype(dtype)
        self.embedding = param(
            rngs, normal(init_std), (vocab_size, dim), ("vocab", "embed"), param_dtype
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(cast(self.embedding, self.dtype), tokens, axis=0)
        return constrain(x, ("batch", "length", "act_embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        logits = jnp.einsum("btd,vd->btv", x, cast(self.embedding, self.dtype))
        return constrain(logits, ("batch", "length", "act_vocab"))


class LMHead(nnx.Module):
    """Untied output projection [B, T, D] -> [B, T, V]."""

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        *,
        init_std: float,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs,
        impl: str = "auto",
    ):
        """``impl``: the `tessera.kernels.dense` impl of the projection (``model.dense_impl``)."""
        self.dtype = jnp.dtype(dtype)
        self.impl = impl
        self.kernel = param(
            rngs, normal(init_std), (dim, vocab_size), ("embed", "vocab"), param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = dense(x, cast(self.kernel, self.dtype), impl=self.impl)
        return constrain(logits, ("batch", "length", "act_vocab"))


class ClassHead(nnx.Module):
    """Dense [B, D] -> logits [B, C], computed in float32; ``kernel`` [D, C] and, with ``bias``,
    ``bias`` [C]. ``init_std=0`` starts the kernel at zero (big_vision's ``head_zeroinit``)."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        init_std: float,
        param_dtype: str,
        bias: bool = False,
        rngs: nnx.Rngs,
    ):
        init = zeros if init_std == 0 else normal(init_std)
        self.kernel = param(rngs, init, (dim, num_classes), ("embed", None), param_dtype)
        self.bias = param(rngs, zeros, (num_classes,), (None,), param_dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, D] -> logits [B, C] float32."""
        logits = jnp.einsum(
            "bd,dc->bc", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32)
        )
        return logits if self.bias is None else logits + self.bias[...].astype(jnp.float32)
