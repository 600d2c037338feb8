"""Feed-forward channel mixer: SwiGLU ``wo(silu(x wi_gate) * (x wi_up))`` or a plain GELU MLP
``wo(gelu(x wi))``, optionally with biases on every projection (``model.mlp_bias``).

``model.mlp_activation``: ``swiglu`` (gated; Llama), ``gelu`` (exact erf GELU; HF ViT's
``"gelu"``, BERT) or ``gelu_tanh`` (the tanh approximation; GPT-2, big_vision). Parameters:
``wi_gate``, ``wi_up`` [D, F] (swiglu) or ``wi`` [D, F]; ``wo`` [F, D]; with biases ``bi_gate``,
``bi_up`` [F] (swiglu) or ``bi`` [F], and ``bo`` [D].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tessera.configs.base import ConfigDict
from tessera.kernels.dense import dense, dense_many
from tessera.layers.base import cast, normal, param, zeros
from tessera.sharding import constrain

if TYPE_CHECKING:  # a runtime import would be circular: the mixers package registers MLP
    from tessera.layers.mixers.base import Aux, SeqInfo

ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh")


class MLP(nnx.Module):
    """[B, T, D] -> [B, T, D] through a hidden layer of width ``cfg.mlp_dim``."""

    REMAT_SAVED = ("mlp_out",)
    LOGICAL_RULES: dict[str, tuple[str, ...]] = {}

    def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
        if cfg.mlp_activation not in ACTIVATIONS:
            raise ValueError(
                f"model.mlp_activation: unknown activation {cfg.mlp_activation!r}; "
                f"known: {', '.join(ACTIVATIONS)}"
            )
        d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
        self.activation = cfg.mlp_activation
        self.dtype = jnp.dtype(cfg.dtype)
        self.dense_impl = cfg.get("dense_impl", "auto")
        init = normal(cfg.init_std)
        bias = bool(cfg.mlp_bias)
        if self.activation == "swiglu":
            self.wi_gate = param(rngs, init, (d, f), ("embed", "mlp"), pd)
            self.wi_up = param(rngs, init, (d, f), ("embed", "mlp"), pd)
            self.bi_gate = param(rngs, zeros, (f,), ("mlp",), pd) if bias else None
            self.bi_up = param(rngs, zeros, (f,), ("mlp",), pd) if bias else None
        else:
            self.wi = param(rngs, init, (d, f), ("embed", "mlp"), pd)
            self.bi = param(rngs, zeros, (f,), ("mlp",), pd) if bias else None
        self.wo = param(rngs, init, (f, d), ("mlp", "embed"), pd)
        self.bo = param(rngs, zeros, (d,), ("embed",), pd) if bias else None

    def _dense(self, x: jax.Array, w: nnx.Param, b: nnx.Param | None) -> jax.Array:
        y = dense(x, cast(w, self.dtype), impl=self.dense_impl)
        return y if b is None else y + cast(b, self.dtype)

    def __call__(self, x: jax.Array, info: SeqInfo | None = None) -> tuple[jax.Array, Aux]:
        del info  # every token is transformed alike
        if self.activation == "swiglu":
            # one dense call for both: the CPU decode kernel splits them across threads as one job
            gate, up = dense_many(
                x, (cast(self.wi_gate, self.dtype), cast(self.wi_up, self.dtype)),
                impl=self.dense_impl,
            )
            gate = gate if self.bi_gate is None else gate + cast(self.bi_gate, self.dtype)
            up = up if self.bi_up is None else up + cast(self.bi_up, self.dtype)
            h = jax.nn.silu(gate) * up
        else:
            h = jax.nn.gelu(
                self._dense(x, self.wi, self.bi), approximate=self.activation == "gelu_tanh"
            )
        h = checkpoint_name(constrain(h, ("batch", "length", "act_mlp")), "mlp_hidden")
        out = self._dense(h, self.wo, self.bo)
        return checkpoint_name(constrain(out, ("batch", "length", "act_embed")), "mlp_out"), {}

    @staticmethod
    def flops_per_token(cfg: ConfigDict, seq_len: int) -> float:
        del seq_len
        matrices = 3 if cfg.mlp_activation == "swiglu" else 2
        return 2 * matrices * cfg.d_model * cfg.mlp_dim
