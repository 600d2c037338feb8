"""Helpers the model tests share: random host-made parameters, remat regions of a jaxpr."""

import jax
import jax.numpy as jnp
import numpy as np


def random_params(spec, seed=0):
    """Random parameters made on the host (jitted threefry init compiles slowly on CPU): weights
    ~ N(0, init_std), norm parameters ~ 1 + N(0, 0.1); biases are non-zero too."""
    rng = np.random.default_rng(seed)

    def one(shape, names):
        noise = rng.normal(size=shape.shape)
        value = 1.0 + 0.1 * noise if names[-1] == "norm" else spec.cfg.init_std * noise
        return jnp.asarray(value, shape.dtype)

    return jax.tree.map(one, spec.shapes, spec.axis_names)


def remat_policies_in(jaxpr):
    """The policy of every rematerialised region in a jaxpr, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        if "policy" in eqn.params:
            yield eqn.params["policy"]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if hasattr(sub, "eqns"):
                    yield from remat_policies_in(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from remat_policies_in(sub.jaxpr)
