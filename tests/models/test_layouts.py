"""Layer layouts and block outputs: a prefix before the scanned unit, per-block settings (sliding
window, RoPE theta), auxiliary losses through the scanned stack, per-mixer FLOP counts."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.layers import mixers
from tessera.layers.base import cast, normal, param
from tessera.layers.mixers.base import SeqInfo
from tessera.models.create import ModelSpec
from tessera.models.layout import compress_layers, parse_layout
from tessera.models.registry import build_model
from tessera.train import flops as flops_lib
from tests.cached_decode import check_cached_decode
from tests.models.test_lm import TOL, build, model_cfg, random_tokens, xent

# -- per-block settings ----------------------------------------------------------------------


def test_parse_layout_and_errors():
    cfg = model_cfg(prefix=("attention:mlp",), num_layers=5,
                    pattern=("attention:mlp sliding_window=4 rope_theta=100", "mamba2:none"))
    layout = parse_layout(cfg)
    assert layout.repeats == 2 and [str(s) for s in layout.prefix] == ["attention:mlp"]
    first = layout.pattern[0]
    assert first.settings == (("rope_theta", 100.0), ("sliding_window", 4))
    assert first.config(cfg).sliding_window == 4 and cfg.sliding_window == 0
    assert [s.mixer for s in layout.layers()] == ["attention", "attention", "mamba2"] * 1 + [
        "attention", "mamba2"]
    assert layout.layer_index(1, 1) == 4
    for pattern, message in [
        (("attention:mlp window=4",), r"'window=4' in 'attention:mlp window=4' is not a per-block"),
        (("attention:mlp sliding_window=four",), "sliding_window='four' .* is not a int"),
        (("attention:mlp d_model=64",), "not a per-block setting"),
        (("attentoin:mlp",), r"model.pattern\[0\]: unknown mixer 'attentoin'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_layout(model_cfg(pattern=pattern, num_layers=2))
    with pytest.raises(ValueError, match=r"num_layers=4 minus 1 prefix blocks \(3\) is not a "
                                         "positive multiple of the pattern length 2"):
        parse_layout(model_cfg(prefix=("attention:mlp",), pattern=("attention:mlp",) * 2,
                               num_layers=4))


def test_compress_layers():
    assert compress_layers(["a", "a", "b", "b", "b"]) == (("a", "a"), ("b",))
    assert compress_layers(["l", "g"] * 3) == ((), ("l", "g"))
    assert compress_layers(["x"] + ["l", "l", "g"] * 2) == (("x",), ("l", "l", "g"))
    assert compress_layers(["a", "b", "c"]) == ((), ("a", "b", "c"))


@pytest.mark.parametrize(
    "setting, model_level",
    [("sliding_window=4", dict(sliding_window=4)), ("rope_theta=50.0", dict(rope_theta=50.0))],
)
def test_per_block_setting_equals_the_model_level_setting(setting, model_level):
    """A setting given per block computes exactly what the same model-level setting does, and
    differs from the model without it (so it is really used)."""
    tokens = random_tokens((2, 12), 61, seed=1)
    _, params, apply_block = build(model_cfg(pattern=(f"attention:mlp {setting}",)))
    _, _, apply_model = build(model_cfg(**model_level))
    _, _, apply_plain = build(model_cfg())
    block = apply_block(params, tokens).logits
    np.testing.assert_allclose(block, apply_model(params, tokens).logits, **TOL)
    assert not np.allclose(block, apply_plain(params, tokens).logits, atol=1e-3)


LOCAL_GLOBAL = dict(pattern=("attention:mlp sliding_window=4", "attention:mlp"), num_layers=4)
DEEPSEEK_LIKE = dict(prefix=("attention:mlp",), pattern=("attention:none", "mamba2:mlp"),
                     num_layers=5)


@pytest.mark.parametrize("overrides", [LOCAL_GLOBAL, DEEPSEEK_LIKE],
                         ids=["local_global", "prefix_unit"])
def test_layouts_decode_cached_equals_uncached(overrides):
    """Prefill, a chunk, then single tokens through the cache give the uncached logits. With a
    global block among local ones the cache keeps every position (shared slots); the prefix
    block keeps its own unstacked cache."""
    length = 11
    cfg = model_cfg(**overrides)
    cfg.ssm.update(head_dim=16, chunk_size=4)
    spec, params, apply = build(cfg)
    model = spec.merge(params)
    tokens = random_tokens((2, length), cfg.vocab_size, seed=5)
    full = apply(params, tokens).logits
    cache = model.init_cache(2, length)
    assert cache["positions"].shape == (2, length)
    assert len(cache["prefix"]) == len(cfg.prefix)
    if cfg.prefix:
        assert cache["prefix"][0]["k"].shape == (2, length, cfg.num_kv_heads, cfg.head_dim)
        assert "prefix" in params and "units" in params
    check_cached_decode(apply, params, tokens, full, cache, (4, 3), TOL)


def test_all_local_layers_keep_the_largest_window():
    cfg = model_cfg(pattern=("attention:mlp sliding_window=4", "attention:mlp sliding_window=6"),
                    num_layers=2)
    spec, params, apply = build(cfg)
    model = spec.merge(params)
    assert model.cache_length(32) == 6
    tokens = random_tokens((1, 10), cfg.vocab_size, seed=6)
    check_cached_decode(apply, params, tokens, apply(params, tokens).logits,
                        model.init_cache(1, 10), (3,), TOL)


@pytest.mark.slow
def test_prefix_layout_trains_a_step(tmp_path):
    from tessera.train.trainer import train
    from tests.train.helpers import tiny_config

    cfg = tiny_config("train.steps=2,checkpoint.every=2,eval.every=0", data=1)
    cfg.model.update(prefix=("attention:mlp",), pattern=("attention:none", "mamba2:mlp"),
                     num_layers=5)
    cfg.model.ssm.update(head_dim=32, chunk_size=8)
    result = train(cfg, str(tmp_path), devices=jax.devices()[:1])
    assert result.step == 2 and all(np.isfinite(v) for v in result.losses.values())


# -- auxiliary outputs -----------------------------------------------------------------------


class ToyAuxMLP(nnx.Module):
    """A channel mixer that emits an auxiliary loss (mean square of its output over real
    tokens, times 0.5) and a per-layer statistic: a stand-in for an MoE router's outputs."""

    def __init__(self, cfg, *, rngs):
        self.w = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.d_model), ("embed", "mlp"),
                       cfg.param_dtype)

    def __call__(self, x, info: SeqInfo):
        y = jnp.tanh(x @ cast(self.w, x.dtype))
        real = (info.segment_ids > 0)[..., None]
        loss = 0.5 * jnp.sum(jnp.where(real, y * y, 0.0)) / jnp.maximum(jnp.sum(real), 1)
        return y, {"toy_loss": loss, "toy_load": jnp.mean(y, axis=(0, 1))[:3]}


@pytest.fixture
def toy_channel(monkeypatch):
    monkeypatch.setitem(mixers.CHANNEL_MIXERS, "toy", ToyAuxMLP)


def _unrolled_params(params_scan, repeats):
    out = dict(params_scan)
    out["units"] = {i: jax.tree.map(lambda a, i=i: a[i], params_scan["units"])
                    for i in range(repeats)}
    return out


def test_aux_loss_reaches_gradients_scanned_and_unrolled(toy_channel):
    """Aux losses are summed over layers (prefix and scanned unit), statistics stacked in depth
    order; the aux loss moves the gradients, identically with the stack scanned or unrolled."""
    layout = dict(prefix=("attention:toy",), pattern=("attention:toy", "attention:mlp"),
                  num_layers=5)
    spec_s, params_s, _ = build(model_cfg(**layout))
    spec_l = ModelSpec(model_cfg(scan_layers=False, **layout))
    params_l = _unrolled_params(params_s, 2)
    tokens = random_tokens((2, 9), 61, seed=2)
    segments = jnp.array([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)
    targets = random_tokens((2, 9), 61, seed=3)

    def run(spec, params, weight):
        def loss(p):
            out = spec.merge(p)(tokens, segment_ids=segments)
            return xent(out.logits, targets) + weight * out.aux["toy_loss"], out.aux

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss_s, aux_s), grads_s = run(spec_s, params_s, 1.0)
    (loss_l, aux_l), grads_l = run(spec_l, params_l, 1.0)
    assert set(aux_s) == {"toy_loss", "toy_load"}
    assert aux_s["toy_load"].shape == (3, 3)  # layers 0 (prefix), 1 and 3 emit it
    np.testing.assert_allclose(loss_l, loss_s, **TOL)
    for key in aux_s:
        np.testing.assert_allclose(aux_l[key], aux_s[key], **TOL)
    np.testing.assert_allclose(grads_l["prefix"][0]["channel"]["w"],
                               grads_s["prefix"][0]["channel"]["w"], **TOL)
    for i in range(2):
        jax.tree.map(lambda gl, gs, i=i: np.testing.assert_allclose(gl, gs[i], **TOL),
                     grads_l["units"][i], grads_s["units"])

    # Without the aux term the toy mixer's gradients differ: the aux loss reaches them.
    assert float(aux_s["toy_loss"]) > 0
    (_, _), grads_no_aux = run(spec_s, params_s, 0.0)
    w_with = grads_s["units"]["blocks"][0]["channel"]["w"]
    w_without = grads_no_aux["units"]["blocks"][0]["channel"]["w"]
    assert not np.allclose(w_with, w_without, atol=1e-6)


def test_aux_padding_is_left_out(toy_channel):
    """The channel mixer sees SeqInfo: tokens under padding do not enter its statistics."""
    spec, params, apply = build(model_cfg(pattern=("attention:toy",), num_layers=1))
    tokens = random_tokens((1, 6), 61, seed=4)
    real = apply(params, tokens[:, :4]).aux["toy_loss"]
    noise = tokens.at[:, 4:].set(7)
    padded = apply(params, noise, segment_ids=jnp.array([[1, 1, 1, 1, 0, 0]])).aux["toy_loss"]
    np.testing.assert_allclose(padded, real, **TOL)


# -- FLOPs -----------------------------------------------------------------------------------


def test_layout_flops_match_cost_analysis():
    """Each mixer counts its own FLOPs; a prefix + unit layout sums them per layer."""
    cfg = load_config("llama:tiny,model.dtype=float32,model.scan_layers=False").model
    cfg.update(prefix=("attention:mlp",), pattern=("attention:none", "attention:mlp"),
               num_layers=5, d_model=128, mlp_dim=256)
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    b, t = 2, 64

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    cost = jax.jit(forward).lower(abstract, jax.ShapeDtypeStruct((b, t), jnp.int32)).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] == pytest.approx(flops_lib.forward_flops_per_token(cfg, t) * b * t,
                                          rel=0.05)


def test_mixer_without_flops_warns_and_gives_none(toy_channel):
    flops_lib._warned.discard("toy")
    cfg = model_cfg(pattern=("attention:toy",), num_layers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert flops_lib.forward_flops_per_token(cfg, 16) is None
        assert flops_lib.forward_flops_per_token(cfg, 16) is None
    assert [str(w.message) for w in caught] == [
        "mixer 'toy' declares no flops_per_token: no FLOP count, TFLOP/s or MFU is reported for "
        "models that use it"
    ]
