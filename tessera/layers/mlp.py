"""SwiGLU feed-forward: ``wo(silu(x wg) * (x wu))``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.layers.base import cast, normal, param
from tessera.sharding import constrain

if TYPE_CHECKING:  # a runtime import would be circular: the mixers package registers MLP
    from tessera.layers.mixers.base import Aux, SeqInfo


class MLP(nnx.Module):
    """[B, T, D] -> [B, T, D] through a gated hidden layer of width ``cfg.mlp_dim``."""

    REMAT_SAVED = ("mlp_out",)
    LOGICAL_RULES: dict[str, tuple[str, ...]] = {}

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.dtype = jnp.dtype(cfg.dtype)
        init = normal(cfg.init_std)
        self.wi_gate = param(rngs, init, (d, f), ("embed", "mlp"), cfg.param_dtype)
        self.wi_up = param(rngs, init, (d, f), ("embed", "mlp"), cfg.param_dtype)
        self.wo = param(rngs, init, (f, d), ("mlp", "embed"), cfg.param_dtype)

    def __call__(self, x: jax.Array, info: SeqInfo | None = None) -> tuple[jax.Array, Aux]:
        del info  # every token is transformed alike
        gate = jnp.einsum("btd,df->btf", x, cast(self.wi_gate, self.dtype))
        up = jnp.einsum("btd,df->btf", x, cast(self.wi_up, self.dtype))
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        h = checkpoint_name(h, "mlp_hidden")
        out = jnp.einsum("btf,fd->btd", h, cast(self.wo, self.dtype))
        return checkpoint_name(constrain(out, ("batch", "length", "act_embed")), "mlp_out"), {}

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        del seq_len
        return 2 * 3 * cfg.d_model * cfg.mlp_dim
