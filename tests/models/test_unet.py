"""The U-Net denoiser: shapes, config and input errors, the class-label path (null class
included), remat, sharded vs unsharded forward and gradients, the FLOP count against XLA's
cost_analysis, and the SD-2.1 parameter count. Parity with diffusers is in
tests/convert/test_unet_import.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.configs.base import base_config
from tessera.models.create import ModelSpec
from tessera.models.registry import build_model
from tessera.models.remat import remat_policy
from tessera.models.unet import flops_per_example
from tessera.sharding import make_mesh, make_rules, use_mesh
from tests.models.helpers import random_params, remat_policies_in

# 8 x 8 x 4 inputs, two levels of 8 and 16 channels, attention on both, a 3-token context.
SMALL = dict(name="unet", image_size=8, num_channels=4, num_classes=0, dtype="float32",
             init_std=0.2)
SMALL_UNET = dict(
    block_out_channels=(8, 16), attention_levels=(True, True), num_attention_heads=(2, 4),
    layers_per_block=1, cross_attention_dim=8, norm_groups=4,
)
TOL = dict(rtol=2e-5, atol=2e-5)


def unet_config(unet=None, **model):
    """A full config whose model is SMALL (+ ``model``) with model.unet SMALL_UNET (+ ``unet``)."""
    config = base_config()
    config.model.update(**{**SMALL, **model})
    config.model.unet.update(**{**SMALL_UNET, **(unet or {})})
    return config


def build(cfg, seed=0):
    """(spec, params, apply): apply(params, x, t, labels=None, context=None) is jitted."""
    spec = ModelSpec(cfg)

    def apply(params, x, t, labels=None, context=None):
        return spec.merge(params)(x, t, labels=labels, context=context)

    return spec, random_params(spec, seed), jax.jit(apply)


def inputs(batch, size=8, seed=0, tokens=3, width=8):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, size, size, 4)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, size=batch), jnp.int32)
    context = jnp.asarray(rng.normal(size=(batch, tokens, width)), jnp.float32)
    return x, t, context


@pytest.fixture(scope="module")
def text():
    """Context-conditioned (num_classes=0)."""
    return build(unet_config().model)


@pytest.fixture(scope="module")
def classes():
    """Class-conditioned: 3 classes plus the null class."""
    return build(unet_config(num_classes=3).model)


def test_shapes_and_dtypes(text):
    spec, params, apply = text
    x, t, context = inputs(2)
    out = apply(params, x, t, context=context)
    assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 0.1
    assert "class_embed" not in params
    kernel = params["down_blocks"]["1"]["attentions"]["0"]["transformer_blocks"]["0"]["ff"]
    assert kernel["proj"]["kernel"].shape == (16, 128) and kernel["out"]["kernel"].shape == (64, 16)
    # other sizes run (the network is convolutional); bf16 compute still returns float32
    model = spec.merge(params)
    big = jax.eval_shape(lambda: model(jnp.zeros((1, 16, 24, 4)), t[:1], context=context[:1]))
    assert big.shape == (1, 16, 24, 4)
    bf16 = ModelSpec(unet_config(dtype="bfloat16").model)
    out = jax.eval_shape(lambda p: bf16.merge(p)(x, t, context=context), bf16.shapes)
    assert out.dtype == jnp.float32


def test_timesteps_and_context_change_the_output(text):
    """Float timesteps too: int t and the same values as floats agree."""
    _, params, apply = text
    x, t, context = inputs(2)
    base = apply(params, x, t, context=context)
    ft = t.astype(jnp.float32)
    np.testing.assert_array_equal(apply(params, x, ft, context=context), base)
    assert np.abs(apply(params, x, ft + 100.5, context=context) - base).max() > 1e-3
    # attention has no positions: the order of the context tokens does not matter, their values do
    np.testing.assert_allclose(apply(params, x, ft, context=context[:, ::-1]), base, **TOL)
    assert np.abs(apply(params, x, ft, context=-context) - base).max() > 1e-3


def test_class_labels_are_a_one_token_context(classes):
    spec, params, apply = classes
    table = params["class_embed"]
    assert table.shape == (4, 8)  # 3 classes + the null class (row 3)
    x, t, _ = inputs(4)
    labels = jnp.array([0, 2, 3, 1])
    context = spec.merge(params)._context(4, labels, None)
    np.testing.assert_array_equal(context, table[labels][:, None, :])
    got = apply(params, x, t, labels=labels)
    null = apply(params, x, t, labels=jnp.full((4,), 3))
    assert np.abs(null - got).max() > 1e-3 and np.all(np.isfinite(null))
    bad = apply(params, x, t, labels=jnp.array([0, 4, 3, 1]))  # label 4 is past the null class
    assert np.isnan(bad[1]).all() and np.isfinite(np.delete(bad, 1, axis=0)).all()


@pytest.mark.parametrize("unet, model, message", [
    (dict(attention_levels=(True,)), {}, "model.unet.attention_levels has 1 entries for 2 levels"),
    (dict(num_attention_heads=(2, 4, 4)), {},
     "model.unet.num_attention_heads has 3 entries for 2 levels"),
    (dict(block_out_channels=(8, 18)), {},
     "block_out_channels=(8, 18): 18 channels do not split into model.unet.norm_groups=4"),
    (dict(num_attention_heads=(3, 4)), {},
     "model.unet.num_attention_heads[0]=3 does not divide block_out_channels[0]=8"),
    (dict(attention_levels=(True, False), num_attention_heads=(2, 3)), {},
     "model.unet.num_attention_heads[1]=3 does not divide"),  # the middle block attends
    ({}, dict(image_size=9), "model.image_size=9 is not divisible by 2 ** (levels - 1) = 2"),
    (dict(layers_per_block=0), {}, "model.unet.layers_per_block=0 must be at least 1"),
    ({}, dict(remat="most"), "model.remat: unknown policy 'most'"),
])
def test_config_errors(unet, model, message):
    cfg = unet_config(unet, **model).model
    with pytest.raises(ValueError, match=re.escape(message)):
        nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


def test_input_errors(text, classes):
    spec, params, _ = text
    model = spec.merge(params)
    x, t, context = inputs(2)
    cases = [
        (lambda: model(x[..., :3], t, context=context), "unet expects x [batch, H, W, 4]"),
        (lambda: model(x[:, :7], t, context=context), "H, W multiples of 2; got shape (2, 7, 8"),
        (lambda: model(x.astype(jnp.int32), t, context=context), "unet expects float x"),
        (lambda: model(x, t[:1], context=context), "unet expects timesteps t [2]"),
        (lambda: model(x, t), "unet needs exactly one of labels"),
        (lambda: model(x, t, labels=t, context=context), "unet needs exactly one of labels"),
        (lambda: model(x, t, context=context[..., :4]), "unet expects context [2, tokens, 8]"),
        (lambda: model(x, t, labels=t), "no class embedding (model.num_classes=0)"),
    ]
    labelled = classes[0].merge(classes[1])
    cases.append((lambda: labelled(x, t, labels=t.astype(jnp.float32)), "expects int labels [2]"))
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            jax.eval_shape(call)


def test_remat_wraps_each_block(text):
    """Each resnet and each Transformer2D is a rematerialised region under the policy."""
    _, params, _ = text
    remat = ModelSpec(unet_config(remat="full").model)
    x, t, context = inputs(2)

    def loss(p):
        return jnp.mean(remat.merge(p)(x, t, context=context) ** 2)

    policies = list(remat_policies_in(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
    # 2 resnets + 1 transformer per down level, 2 + 1 in the middle, 2 + 2 per up level
    assert len(policies) == 2 * 2 + 3 + 2 * 4
    assert set(policies) == {remat_policy("full")}


def test_sharded_forward_and_gradients_match_unsharded():
    """fsdp=4 x data=2 on the 8 host devices: parameters placed by the rules, the forward and
    the gradients of an MSE equal the single-device ones. One level (resnet + transformer down,
    the middle, two up with their skips) keeps the two compiles of the gradient short."""
    config = unet_config(unet=dict(block_out_channels=(16,), attention_levels=(True,),
                                   num_attention_heads=(2,)))
    config.mesh.update(data=2, fsdp=4)
    mesh, rules = make_mesh(config.mesh), make_rules(config.mesh.rules)
    spec = ModelSpec(config.model)
    params = jax.device_put(random_params(spec), spec.shardings(mesh, rules))
    kernel = params["down_blocks"]["0"]["resnets"]["0"]["conv1"]["kernel"]  # [3, 3, 16, 16]
    assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "fsdp")), 4)
    x, t, context = inputs(8, seed=3)
    target = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)

    def loss(p):
        out = spec.merge(p)(x, t, context=context)
        return jnp.mean(jnp.square(out - target)), out

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (want_loss, want_out), want_grads = step(jax.device_get(params))
    with use_mesh(mesh, rules):
        (got_loss, got_out), got_grads = step(params)
    np.testing.assert_allclose(got_out, want_out, **TOL)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got_grads, want_grads)


def test_flops_match_xla_cost_analysis():
    """The analytic count against XLA's for a compiled forward (shapes only, nothing runs),
    wide enough that what the count leaves out (norms, GELU's erf, softmax) is ~2%."""
    cfg = unet_config(dict(block_out_channels=(64, 128), num_attention_heads=(1, 2),
                           attention_levels=(False, True)), image_size=16,
                      attention_impl="xla").model
    spec = ModelSpec(cfg)
    batch, tokens = 2, 5

    def forward(p, x, t, context):
        return spec.merge(p)(x, t, context=context)

    args = (jax.ShapeDtypeStruct((batch, 16, 16, 4), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch, tokens, 8), jnp.float32))
    xla = jax.jit(forward).lower(spec.shapes, *args).compile().cost_analysis()["flops"]
    ours = batch * flops_per_example(cfg, tokens)
    assert ours == pytest.approx(xla, rel=0.04)
    assert ours < xla  # a lower bound: the left-out elementwise work only adds


def test_sd21_parameter_count_and_flops():
    """The default model.unet is SD 2.1's U-Net (4 x 96 x 96 latents, a 77-token 1024-wide
    context): diffusers' parameter count exactly (abstract shapes, nothing allocated), and the
    FLOP count: 2117 GFLOPs, of which 628 are attention scores and values; the other 1489
    GFLOPs (744 G multiply-adds, 760 G counting the taps on the zero padding) are what the
    published 759 "GFLOPs" (multiply-adds of the convs and dense layers) count."""
    config = base_config()
    config.model.update(name="unet", image_size=96, num_channels=4, num_classes=0)
    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == 865_910_724
    assert flops_per_example(config.model, 77) == pytest.approx(2116.6e9, rel=1e-4)
