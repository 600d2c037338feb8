"""The DiT denoiser: shapes and the parameter tree, adaLN-Zero's identity start, the null-class
row, int vs float timesteps, scanned vs unrolled stacks, remat, config and input errors, sharded
vs unsharded forward and gradients, the FLOP count against XLA's and DiT-XL/2's size. Parity
with diffusers is tests/convert/test_dit_import.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.configs.base import base_config
from tessera.models.create import ModelSpec
from tessera.models.dit import flops_per_example, size_fields
from tessera.models.registry import build_model
from tessera.models.remat import remat_policy
from tessera.sharding import make_mesh, make_rules, use_mesh
from tests.models.helpers import random_params, remat_policies_in

# 8 x 8 x 4 latents in 2 x 2 patches (16 tokens), two layers, 10 classes (row 10: null).
SMALL = dict(
    name="dit", image_size=8, patch_size=2, num_channels=4, d_model=32, num_heads=2, head_dim=16,
    mlp_dim=128, num_layers=2, num_classes=10, init_std=0.2, dtype="float32",
)
TOL = dict(rtol=2e-5, atol=2e-5)


def dit_cfg(learn_sigma=True, **overrides):
    cfg = base_config().model
    cfg.update(**{**SMALL, **overrides})
    cfg.dit.update(learn_sigma=learn_sigma, freq_dim=32)
    return cfg


def build(cfg, seed=0):
    """(spec, params, apply): apply(params, x, t, labels) is the jitted call."""
    spec = ModelSpec(cfg)

    def apply(params, x, t, labels):
        return spec.merge(params)(x, t, labels=labels)

    return spec, random_params(spec, seed), jax.jit(apply)


def inputs(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, 8, 8, 4)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, size=batch), jnp.int32)
    labels = jnp.asarray(np.arange(batch) % 11, jnp.int32)  # includes the null class 10
    return x, t, labels


@pytest.fixture(scope="module")
def scanned():
    return build(dit_cfg())


def test_shapes_and_parameter_tree(scanned):
    spec, params, apply = scanned
    out = apply(params, *inputs())
    assert out.shape == (4, 8, 8, 8) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all() and float(jnp.std(out)) > 0.1
    shapes = jax.tree.map(lambda s: s.shape, spec.shapes)
    assert shapes["patch_embed"] == {"kernel": (2, 2, 4, 32), "bias": (32,)}
    assert shapes["t_embedder"]["linear_1"] == {"kernel": (32, 32), "bias": (32,)}
    assert shapes["label_embedding"] == (11, 32)
    block = shapes["units"]["blocks"][0]
    assert block["adaln"] == {"kernel": (2, 32, 192), "bias": (2, 192)}
    assert block["attention"]["wq"] == (2, 32, 2, 16) and block["attention"]["bo"] == (2, 32)
    assert block["mlp"]["wi"] == (2, 32, 128) and block["mlp"]["bi"] == (2, 128)
    assert shapes["final_adaln"] == {"kernel": (32, 64), "bias": (64,)}
    assert shapes["proj_out"] == {"kernel": (32, 32), "bias": (32,)}  # 2 * 2 * 8 per token


def test_without_learned_sigma_outputs_the_input_channels():
    spec, params, apply = build(dit_cfg(learn_sigma=False, num_layers=1))
    assert apply(params, *inputs(2)).shape == (2, 8, 8, 4)
    assert spec.shapes["proj_out"]["kernel"].shape == (32, 16)


def test_starts_as_zero_output():
    """adaLN-Zero: every block's modulation and the output projection start at zero, so a
    fresh model is the identity stack and predicts exactly zero."""
    model = build_model(dit_cfg(num_layers=1, scan_layers=False), rngs=nnx.Rngs(0))
    block = model.units[0].blocks[0]
    zero = [block.adaln, model.final_adaln, model.proj_out]
    for leaf in jax.tree.leaves(nnx.state(zero)):
        assert not np.any(np.asarray(leaf))
    assert np.any(np.asarray(block.attention.wq[...]))


def test_int_and_float_timesteps_agree(scanned):
    _, params, apply = scanned
    x, t, labels = inputs(seed=1)
    np.testing.assert_allclose(apply(params, x, t.astype(jnp.float32), labels),
                               apply(params, x, t, labels), **TOL)


def test_bfloat16_compute_follows_float32(scanned):
    """The same parameters in bfloat16 compute (the default): float32 output within bf16's
    rounding of the float32 model's."""
    _, params, apply = scanned
    _, _, apply_bf16 = build(dit_cfg(dtype="bfloat16"))
    x, t, labels = inputs(seed=6)
    want, got = apply(params, x, t, labels), apply_bf16(params, x, t, labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=0.03 * float(jnp.max(jnp.abs(want))))


def test_null_class_row(scanned):
    """Label num_classes reads the table's last row (and only those examples change with it);
    a label outside [0, num_classes] gives NaN rather than a silently clamped row."""
    _, params, apply = scanned
    x, t, _ = inputs(2, seed=2)
    labels = jnp.array([10, 3], jnp.int32)
    base = np.asarray(apply(params, x, t, labels))
    edited = jax.tree.map(lambda a: a, params)
    edited["label_embedding"] = params["label_embedding"].at[10].add(1.0)
    moved = np.asarray(apply(edited, x, t, labels))
    assert not np.allclose(moved[0], base[0], atol=1e-3)
    np.testing.assert_array_equal(moved[1], base[1])
    bad = np.asarray(apply(params, x, t, jnp.array([11, 3], jnp.int32)))
    assert np.isnan(bad[0]).all() and np.isfinite(bad[1]).all()


def test_scanned_and_unrolled_agree(scanned):
    """The same parameters scanned, and unrolled under remat="full": the same output."""
    _, params, apply = scanned
    _, _, apply_loop = build(dit_cfg(scan_layers=False, remat="full"))
    loop = dict(params)
    loop["units"] = {i: jax.tree.map(lambda a, i=i: a[i], params["units"]) for i in range(2)}
    x, t, labels = inputs(seed=3)
    np.testing.assert_allclose(apply_loop(loop, x, t, labels), apply(params, x, t, labels), **TOL)


def test_remat_policy_wraps_each_layer():
    spec, params, _ = build(dit_cfg(remat="minimal"))
    jaxpr = jax.make_jaxpr(lambda p: spec.merge(p)(*inputs(1)[:2], labels=inputs(1)[2]))(params)
    assert list(remat_policies_in(jaxpr.jaxpr)) == [remat_policy("minimal")]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=9), r"^model.image_size=9 is not divisible by model.patch_size=2$"),
        (dict(num_classes=0), r"^dit needs model.num_classes > 0"),
        (dict(num_layers=0), r"^dit needs model.num_layers > 0"),
        (dict(d_model=30, mlp_dim=120), "d_model a multiple of 4"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(dit_cfg(**overrides), rngs=nnx.Rngs(0))
    cfg = dit_cfg()
    cfg.dit.freq_dim = 33
    with pytest.raises(ValueError, match=r"^model.dit.freq_dim=33 must be even and > 2$"):
        build_model(cfg, rngs=nnx.Rngs(0))


def test_input_errors(scanned):
    spec, params, _ = scanned
    model = spec.merge(params)
    x, t, labels = inputs(2)
    with pytest.raises(ValueError, match=r"^dit is class-conditional: context must be None"):
        model(x, t, labels=labels, context=jnp.zeros((2, 3, 32)))
    with pytest.raises(ValueError, match=r"dit expects x \[batch, 8, 8, 4\] .* got shape "
                                         r"\(2, 8, 8, 3\)"):
        model(x[..., :3], t, labels=labels)
    with pytest.raises(ValueError, match="dit expects float x"):
        model(x.astype(jnp.int32), t, labels=labels)
    with pytest.raises(ValueError, match=r"dit expects timesteps t \[2\] .* got shape \(\)"):
        model(x, t[0], labels=labels)
    with pytest.raises(ValueError, match=r"dit expects integer labels \[2\] in \[0, 10\] \(10: "
                                         r"the null class\); got float32 \(2,\)"):
        model(x, t, labels=labels.astype(jnp.float32))


def test_sharded_forward_and_gradients_match_unsharded():
    """fsdp=4 x data=2 on the 8 host devices: parameters placed by the rules, the output and
    the gradients of an MSE equal the single-device ones."""
    config = base_config()
    config.mesh.update(data=2, fsdp=4)
    mesh, rules = make_mesh(config.mesh), make_rules(config.mesh.rules)
    spec = ModelSpec(dit_cfg())
    params = jax.device_put(random_params(spec), spec.shardings(mesh, rules))
    table = params["label_embedding"]
    assert table.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp")), 2)
    assert params["units"]["blocks"][0]["mlp"]["wi"].addressable_shards[0].data.shape == (
        2, 8, 128)
    x, t, labels = inputs(8, seed=4)
    target = jnp.asarray(np.random.default_rng(5).normal(size=(8, 8, 8, 8)), jnp.float32)

    def loss(p):
        out = spec.merge(p)(x, t, labels=labels)
        return jnp.mean(jnp.square(out - target)), out

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (want_loss, want_out), want_grads = step(jax.device_get(params))
    with use_mesh(mesh, rules):
        (got_loss, got_out), got_grads = step(params)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got_grads, want_grads)


def test_flops_match_xla_cost_analysis():
    """The analytic forward count (matmuls) against XLA's count of an unscanned forward, which
    also counts elementwise work: a little above, within 4%."""
    cfg = dit_cfg(d_model=128, num_heads=4, head_dim=32, mlp_dim=512, scan_layers=False)
    spec = ModelSpec(cfg)

    def forward(params, x, t, labels):
        return spec.merge(params)(x, t, labels=labels)

    batch = 2
    args = (spec.shapes, jax.ShapeDtypeStruct((batch, 8, 8, 4), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))
    cost = jax.jit(forward).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ratio = cost["flops"] / (batch * flops_per_example(cfg))
    assert 1.0 <= ratio < 1.04, ratio


def test_dit_xl_2_size_and_flops():
    """DiT-XL/2 (diffusers facebook/DiT-XL-2-256's shape): 674.8M parameters with one
    conditioning embedder (diffusers' copy in each of its 28 blocks makes 749.8M; the paper's
    675M), and 237.2 GFLOPs per 256px image at 2 per multiply-add: the paper's 118.6 Gflops
    count multiply-adds."""
    cfg = dit_cfg(image_size=32, num_channels=4, num_classes=1000, **size_fields("XL/2"))
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (
        1152, 28, 16, 72, 4608)
    cfg.dit.freq_dim = 256
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == 674_834_720
    assert round(flops_per_example(cfg) / 2e9, 1) == 118.6


def test_sizes():
    """The paper's sizes: S / B / L / XL widths and depths, each with patches 2, 4, 8."""
    assert size_fields("S/8") == dict(d_model=384, num_layers=12, num_heads=6, num_kv_heads=6,
                                      head_dim=64, mlp_dim=1536, patch_size=8)
    assert size_fields("B/4")["d_model"] == 768 and size_fields("L/2")["num_layers"] == 24
    for name in ("XL/3", "M/2", "XL"):
        with pytest.raises(ValueError, match=rf"^unknown DiT size '{name}'; known: S, B, L, XL"):
            size_fields(name)
