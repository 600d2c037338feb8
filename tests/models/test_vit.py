"""The ViT: shapes and every pool / position variant, bidirectional attention, scanned vs
unrolled stack, the training-noise RNG contract (dropout, stochastic depth), remat, input and
config errors, and sharded vs unsharded loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.configs import load_config
from tessera.models.create import ModelSpec
from tessera.models.layout import BlockSpec
from tessera.models.registry import build_model
from tessera.models.remat import remat_policy
from tessera.models.stack import Block
from tessera.sharding import make_mesh, make_rules, use_mesh
from tests.models.helpers import random_params, remat_policies_in

# 8 x 8 images in 4 x 4 patches: 4 patches (+ the class token), two layers. init_std is large so
# attention is far from uniform and a wrong mask moves the logits well past the tolerances.
SMALL = dict(
    image_size=8, patch_size=4, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64,
    num_layers=2, num_classes=5, init_std=0.3, dtype="float32",
)
TOL = dict(rtol=2e-5, atol=2e-5)
NOISE = dict(dropout=0.1, stochastic_depth=0.5)


def vit_cfg(**overrides):
    cfg = load_config("vit:tiny").model
    cfg.update(**{**SMALL, **overrides})
    return cfg


def build(cfg, seed=0):
    """(spec, params, apply): apply(params, images, rng=None, train=False) is the jitted call."""
    spec = ModelSpec(cfg)

    def apply(params, images, rng=None, train=False):
        return spec.merge(params)(images, rng=rng, train=train)

    return spec, random_params(spec, seed), jax.jit(apply, static_argnames="train")


def random_images(batch, size=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def xent(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


@pytest.fixture(scope="module")
def plain():
    """pool=cls, learned positions, no training noise."""
    return build(vit_cfg(pos_embedding="learned"))


@pytest.fixture(scope="module")
def noisy():
    """As ``plain`` with dropout and stochastic depth."""
    return build(vit_cfg(pos_embedding="learned", **NOISE))


@pytest.mark.parametrize(
    "pool, pos", [("cls", "learned"), ("cls", "sincos2d"), ("map", "sincos2d"), ("gap", "learned")]
)
def test_every_pool_and_position_variant(pool, pos):
    spec, params, apply = build(vit_cfg(pool=pool, pos_embedding=pos))
    out = apply(params, random_images(3))
    assert out.logits.shape == (3, 5) and out.logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.logits)).all() and out.aux == {}
    shapes = jax.tree.map(lambda s: s.shape, spec.shapes)
    assert ("cls_token" in shapes) == (pool == "cls")
    assert ("map_head" in shapes) == (pool == "map")
    if pos == "learned":
        assert shapes["pos_embedding"] == (4 + (pool == "cls"), 32)
    else:
        assert "pos_embedding" not in shapes
    assert shapes["patch_embed"] == {"kernel": (4, 4, 3, 32), "bias": (32,)}
    assert shapes["head"] == {"kernel": (32, 5), "bias": (5,)}
    block = shapes["units"]["blocks"][0]
    assert block["mixer"]["bo"] == (2, 32) and block["channel"]["wi"] == (2, 32, 64)
    assert block["norm1"] == {"scale": (2, 32), "bias": (2, 32)}


def test_attention_is_bidirectional(plain):
    """The class token (first) reads the last patch; causal attention would hide it."""
    _, params, apply = plain
    images = random_images(2, seed=1)
    changed = images.at[:, 4:, 4:, :].add(1.0)  # the last 4 x 4 patch
    assert not np.allclose(apply(params, images).logits, apply(params, changed).logits, atol=1e-3)
    _, _, apply_causal = build(vit_cfg(pos_embedding="learned", causal=True))
    np.testing.assert_allclose(
        apply_causal(params, images).logits, apply_causal(params, changed).logits, **TOL
    )


def test_scanned_and_unrolled_agree_with_noise(noisy):
    """Same parameters, scanned vs unrolled (and remat'd): same eval logits and the same
    training noise (each layer's key and drop-path rate come from its depth)."""
    spec_scan, params_scan, apply_scan = noisy
    _, _, apply_loop = build(vit_cfg(pos_embedding="learned", scan_layers=False, remat="full",
                                     **NOISE))
    params_loop = dict(params_scan)
    params_loop["units"] = {
        i: jax.tree.map(lambda a, i=i: a[i], params_scan["units"]) for i in range(2)
    }
    images, key = random_images(4, seed=2), jax.random.key(7)
    np.testing.assert_allclose(
        apply_loop(params_loop, images, key, True).logits,
        apply_scan(params_scan, images, key, True).logits,
        **TOL,
    )


def test_eval_is_deterministic_and_ignores_rng(noisy):
    _, params, apply = noisy
    images = random_images(2, seed=3)
    base = apply(params, images).logits
    for key in (jax.random.key(0), jax.random.key(1)):
        np.testing.assert_array_equal(apply(params, images, key).logits, base)


def test_training_noise_follows_the_rng(noisy):
    _, params, apply = noisy
    images = random_images(2, seed=3)
    eval_logits = apply(params, images).logits
    a = apply(params, images, jax.random.key(0), True).logits
    np.testing.assert_array_equal(apply(params, images, jax.random.key(0), True).logits, a)
    b = apply(params, images, jax.random.key(1), True).logits
    assert not np.allclose(a, b, atol=1e-4)
    assert not np.allclose(a, eval_logits, atol=1e-4)


def test_training_needs_an_rng_only_with_noise(noisy, plain):
    _, params, apply = noisy
    with pytest.raises(ValueError, match=r"train=True with model.dropout=0.1, "
                                         r"model.stochastic_depth=0.5 needs an rng"):
        apply(params, random_images(2), None, True)
    _, params, apply = plain  # nothing random: train=True is the eval forward
    images = random_images(2, seed=4)
    np.testing.assert_array_equal(apply(params, images, None, True).logits,
                                  apply(params, images).logits)


def test_drop_path_rate_rises_linearly_over_depth():
    cfg = vit_cfg(num_layers=4, stochastic_depth=0.3)
    block = nnx.eval_shape(lambda: Block(cfg, BlockSpec("attention", "mlp"), rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(block.drop_path_rate(np.arange(4)), [0.0, 0.1, 0.2, 0.3])


def test_full_stochastic_depth_skips_the_last_layer():
    """stochastic_depth=1: the last layer's residual branches are always dropped (it is the
    identity, with zero, finite gradients) and the first layer (rate 0) never is."""
    spec, params, apply = build(vit_cfg(stochastic_depth=1.0))
    images, key = random_images(3, seed=5), jax.random.key(3)
    zeroed = jax.tree.map(lambda a: a, params)
    last = zeroed["units"]["blocks"][0]
    for branch in ("mixer", "channel"):
        for name in ("wo", "bo"):
            last[branch][name] = last[branch][name].at[1].set(0.0)
    want = apply(zeroed, images).logits
    np.testing.assert_allclose(apply(params, images, key, True).logits, want, **TOL)

    labels = jnp.array([0, 1, 2])
    grads = jax.jit(jax.grad(
        lambda p: xent(spec.merge(p)(images, rng=key, train=True).logits, labels)
    ))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    layers = grads["units"]["blocks"][0]
    for g in jax.tree.leaves(layers):
        assert not np.any(np.asarray(g[1]))
    assert np.any(np.asarray(layers["mixer"]["wq"][0]))


def test_remat_policy_wraps_the_stack():
    spec, params, _ = build(vit_cfg(remat="minimal"))
    jaxpr = jax.make_jaxpr(lambda p: spec.merge(p)(random_images(1)).logits)(params).jaxpr
    assert list(remat_policies_in(jaxpr)) == [remat_policy("minimal")]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=30), r"^model.image_size=30 is not divisible by model.patch_size=4$"),
        (dict(pool="max"), r"^model.pool: unknown pooling 'max'"),
        (dict(pos_embedding="rope"), r"^model.pos_embedding: unknown 'rope'"),
        (dict(pos_embedding="sincos2d", d_model=30, num_heads=3, head_dim=10),
         "d_model a multiple of 4"),
        (dict(stochastic_depth=1.5), r"^model.stochastic_depth=1.5 is not in \[0, 1\]$"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(vit_cfg(**overrides), rngs=nnx.Rngs(0))


def test_image_shape_errors(plain):
    _, params, apply = plain
    want = r"vit expects images \[batch, 8, 8, 3\] \(model.image_size, model.num_channels\)"
    for shape in ((2, 16, 16, 3), (2, 8, 8, 1), (8, 8, 3)):
        with pytest.raises(ValueError, match=want + f"; got shape {re_shape(shape)}"):
            apply(params, jnp.zeros(shape))
    with pytest.raises(ValueError, match="vit expects float images"):
        apply(params, jnp.zeros((2, 8, 8, 3), jnp.uint8))


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_sharded_loss_and_gradients_match_unsharded():
    """fsdp=4 x data=2 on the 8 host devices, in training mode (dropout and stochastic depth)
    with MAP pooling: parameters placed by the rules (``ModelSpec.shardings``, what
    ``ModelSpec.init`` creates them with; its jitted random init compiles slowly on CPU and is
    tested with the LM), loss and gradients equal the single-device ones."""
    config = load_config("vit:tiny,mesh.data=2,mesh.fsdp=4")
    cfg = config.model
    cfg.update(**{**SMALL, **NOISE, "pool": "map"})
    mesh, rules = make_mesh(config.mesh), make_rules(config.mesh.rules)
    spec = ModelSpec(cfg)
    params = jax.device_put(random_params(spec), spec.shardings(mesh, rules))
    kernel = params["patch_embed"]["kernel"]
    assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, None, "fsdp")), 4)
    wq = params["units"]["blocks"][0]["mixer"]["wq"]
    assert wq.addressable_shards[0].data.shape == (2, 8, 4, 8)

    images, labels = random_images(8, seed=6), jnp.arange(8) % 5
    key = jax.random.key(11)

    def loss(p):
        return xent(spec.merge(p)(images, rng=key, train=True).logits, labels)

    step = jax.jit(jax.value_and_grad(loss))
    want_loss, want_grads = step(jax.device_get(params))
    with use_mesh(mesh, rules):
        got_loss, got_grads = step(params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    # float32 sums in another order; gradients are O(1) here, except the key biases' (exactly 0:
    # softmax ignores a shift shared by all keys), rounding noise of ~1e-7 either way.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got_grads, want_grads)
