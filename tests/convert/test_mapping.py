"""The mapping layer on its own: transforms invert exactly, config parts read both HF layouts,
and a family whose rules do not cover the model is refused before any tensor is read."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.configs.base import apply_overrides, base_config
from tessera.convert import FAMILIES, ConversionError
from tessera.convert.families.llama import QwenWindow
from tessera.convert.families.rope import Rope
from tessera.convert.mapping import (
    FLAT,
    IDENTITY,
    Concat,
    Conv2d,
    DepthwiseConv,
    Flat,
    LeadingOnes,
    Linear,
    Rule,
)
from tessera.convert.params import flatten, plan
from tessera.models.create import ModelSpec
from tests.convert.helpers import fixture, read

TRANSFORMS = [
    (IDENTITY, [(3, 4)], (3, 4)),
    (Linear(in_dims=1), [(4, 2, 3)], (6, 4)),
    (Linear(in_dims=2), [(2, 3, 4)], (4, 6)),
    (Linear(in_dims=1), [(6,)], (1, 6)),
    (FLAT, [(2, 3)], (6,)),
    (DepthwiseConv(), [(4, 5)], (5, 1, 4)),
    (Concat(Linear(), axis=0), [(4, 2, 3), (4, 5)], (11, 4)),
    (Concat(IDENTITY, axis=1), [(3, 2), (3, 4)], (3, 6)),
    (Conv2d(), [(2, 3, 4, 5)], (5, 4, 2, 3)),
    (LeadingOnes(2), [(5,)], (1, 1, 5)),
]


@pytest.mark.parametrize("transform, ours, hf", TRANSFORMS)
def test_transforms_invert_exactly(transform, ours, hf):
    rng = np.random.default_rng(0)
    assert transform.hf_shape(ours) == hf
    x = rng.standard_normal(hf).astype(np.float32)
    parts = transform.to_ours(x, ours)
    assert [p.shape for p in parts] == ours
    np.testing.assert_array_equal(transform.to_hf(parts), x)


@pytest.mark.parametrize("transform, ours, hf", TRANSFORMS)
def test_region_reads_the_block_a_shard_needs(transform, ours, hf):
    """For random blocks of each parameter, ``region`` names a block of the HF tensor that
    gives the parameter's values there; it is no larger than the values where only the first
    axis of what HF flattens into one axis is sliced (always, for transforms that flatten
    nothing)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(hf).astype(np.float32)
    flattens = isinstance(transform, (Linear, Flat)) or (
        isinstance(transform, Concat) and isinstance(transform.part, Linear)
    )
    for k, shape in enumerate(ours):
        want = transform.to_ours(x, ours)[k]
        for _ in range(20):
            starts = [int(rng.integers(0, n)) for n in shape]
            index = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(starts, shape))
            if flattens and rng.random() < 0.5:  # only the leading axes sliced
                index = tuple(s if i == 0 else slice(None) for i, s in enumerate(index))
            block, finish = transform.region(ours, k, index)
            assert len(block) == len(hf) and all(0 <= s.start < s.stop <= n
                                                 for s, n in zip(block, hf))
            got = finish(x[block])
            np.testing.assert_array_equal(got, want[index])
            size = np.prod([s.stop - s.start for s in block])
            if not flattens or all(s == slice(None) for s in index[1:]):
                assert size == got.size, (index, block)


def test_linear_matches_torch_semantics():
    """y = x W^T in torch; tessera contracts x with the kernel's input axes."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4))  # o_proj-like: [d_out, heads * head_dim]
    (kernel,) = Linear(in_dims=2).to_ours(w, [(2, 2, 6)])
    x = rng.standard_normal((2, 2))
    np.testing.assert_allclose(np.einsum("hk,hkd->d", x, kernel), w @ x.reshape(-1))


def test_conv2d_matches_torch_semantics():
    """A patch conv in torch (NCHW, OIHW weight, stride = kernel) and in tessera (NHWC, HWIO
    kernel, PatchEmbed's einsum) of the same image: out[o, y, x] = sum_cij w[o, c, i, j]
    img[c, 2y + i, 2x + j]."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 3, 2, 2))
    image = rng.standard_normal((3, 4, 6))  # C, H, W
    want = np.einsum("ocij,cyixj->oyx", w, image.reshape(3, 2, 2, 3, 2))
    (kernel,) = Conv2d().to_ours(w, [(2, 2, 3, 5)])
    patches = image.transpose(1, 2, 0).reshape(2, 2, 3, 2, 3)  # y, i, x, j, c
    np.testing.assert_allclose(np.einsum("yixjc,ijco->oyx", patches, kernel), want)


def test_rope_reads_both_transformers_layouts_and_round_trips():
    legacy = {"rope_theta": 5e5, "max_position_embeddings": 4096,
              "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert Rope().from_hf(legacy) == {"rope_theta": 5e5, "rope_scaling.type": "linear",
                                      "rope_scaling.factor": 2.0}
    v5 = {"max_position_embeddings": 256,
          "rope_parameters": {"rope_type": "yarn", "factor": None, "rope_theta": 1e4,
                              "original_max_position_embeddings": 64}}
    fields = Rope().from_hf(v5)
    assert fields["rope_scaling.factor"] == 4.0 and fields["rope_scaling.beta_fast"] == 32.0
    for kind, hf in [("none", {}), ("linear", legacy), ("yarn", v5)]:
        fields = Rope().from_hf({**hf, "max_position_embeddings": 256})
        config = base_config()
        apply_overrides(config, {f"model.{k}": v for k, v in fields.items()})
        assert config.model.rope_scaling.type == kind
        exported = Rope().to_hf(config.model)
        assert Rope().from_hf({**exported, "max_position_embeddings": 256}) == fields
    with pytest.raises(ConversionError, match="per layer type"):
        Rope().from_hf({"layer_types": ["full_attention"],
                        "rope_parameters": {"full_attention": {"rope_type": "default"}}})


def test_sliding_window_parts():
    mistral = next(p for p in FAMILIES["mistral"].config if getattr(p, "hf", "") ==
                   "sliding_window")
    assert mistral.from_hf({"sliding_window": None}) == {"sliding_window": 0}
    assert mistral.from_hf({}) == {"sliding_window": 4096}  # MistralConfig's default
    qwen = QwenWindow()
    one = {"prefix": (), "pattern": ("attention:mlp",)}
    base = {"num_hidden_layers": 2, "sliding_window": 16}
    assert qwen.from_hf(base) == {"sliding_window": 0, **one}  # use_sliding_window: False
    assert qwen.from_hf({**base, "use_sliding_window": True, "max_window_layers": 0}) == {
        "sliding_window": 16, **one}
    assert qwen.from_hf({**base, "use_sliding_window": True, "max_window_layers": 2}) == {
        "sliding_window": 0, **one}


def test_qwen_mixed_windows_become_a_layout_and_export_back():
    """Qwen2's first max_window_layers full layers, then sliding ones: a prefix plus a scanned
    unit with a per-block window; transformers 5's layer_types alternations become a unit."""
    qwen = QwenWindow()
    hf = {"num_hidden_layers": 5, "sliding_window": 16, "use_sliding_window": True,
          "max_window_layers": 2}
    fields = qwen.from_hf(hf)
    assert fields == {"sliding_window": 0, "prefix": ("attention:mlp",) * 2,
                      "pattern": ("attention:mlp sliding_window=16",)}
    config = load_config("llama:tiny,model.num_layers=5")
    config.model.update(fields)
    exported = qwen.to_hf(config.model)
    assert exported["max_window_layers"] == 2 and exported["sliding_window"] == 16
    assert exported["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 3
    alternating = ["sliding_attention", "full_attention"] * 3
    fields = qwen.from_hf({**hf, "num_hidden_layers": 6, "layer_types": alternating})
    assert fields["prefix"] == () and fields["pattern"] == (
        "attention:mlp sliding_window=16", "attention:mlp")
    with pytest.raises(ConversionError, match="layer_types has 3 entries"):
        qwen.from_hf({**hf, "layer_types": alternating[:3]})
    config.model.update(prefix=(), pattern=("attention:mlp sliding_window=8",
                                            "attention:mlp sliding_window=16"), num_layers=4)
    with pytest.raises(ConversionError, match=r"sliding windows \[8, 16\]"):
        qwen.to_hf(config.model)
    config.model.update(pattern=("attention:mlp rope_theta=100",))
    with pytest.raises(ConversionError, match="one RoPE theta"):
        qwen.to_hf(config.model)


def test_rules_must_cover_every_parameter():
    config = read(fixture("qwen2")).config
    shapes = flatten(ModelSpec(config.model).shapes)
    family = FAMILIES["qwen2"]
    partial = dataclasses.replace(family, rules=family.rules[:-1])
    with pytest.raises(ConversionError, match="no rule fills tessera parameter "
                       "units/blocks/0/channel/wo"):
        plan(partial, config.model, shapes)
    twice = dataclasses.replace(family, rules=(*family.rules,
                                               Rule("extra.{layer}", "channel/wo", Linear())))
    with pytest.raises(ConversionError, match="filled by both"):
        plan(twice, config.model, shapes)


def test_unscanned_layers_get_the_same_values():
    scanned = read(fixture("qwen3")).params
    unrolled = read(fixture("qwen3"), **{"model.scan_layers": False}).params
    for r in range(2):
        jax.tree.map(
            lambda a, b, r=r: np.testing.assert_array_equal(np.asarray(a)[r], np.asarray(b)),
            scanned["units"]["blocks"], unrolled["units"][r]["blocks"],
        )


def _fla(name, **changes):
    """The fixture's config.json with ``changes``."""
    with open(fixture(name) + "/config.json") as f:
        return {**json.load(f), **changes}


def test_fla_widths_for_null_keys_are_fla_layer_defaults():
    """Null sizes take the width fla's layers compute (values printed by fla 0.6.0's
    RWKV7Attention / RWKV6FeedForward / RWKV7FeedForward / GatedMLP at these widths)."""
    rwkv7 = FAMILIES["rwkv7"].model_fields(_fla(
        "rwkv7", hidden_size=2048, head_dim=64, value_dim=None, intermediate_size=None,
        hidden_ratio=None, decay_low_rank_dim=None, a_low_rank_dim=None, v_low_rank_dim=None,
        gate_low_rank_dim=None))
    assert (rwkv7["rwkv7.decay_low_rank_dim"], rwkv7["rwkv7.a_low_rank_dim"],
            rwkv7["rwkv7.v_low_rank_dim"], rwkv7["rwkv7.gate_low_rank_dim"]) == (128, 128, 64, 224)
    assert rwkv7["mlp_dim"] == 8192 and rwkv7["head_dim"] == 64
    rwkv6 = FAMILIES["rwkv6"].model_fields(_fla("rwkv6", hidden_size=100, intermediate_size=None,
                                                num_heads=4))
    assert rwkv6["mlp_dim"] == 352 and rwkv6["rwkv6.head_dim"] == 25
    retnet = FAMILIES["retnet"].model_fields(_fla("retnet", hidden_size=2048,
                                                  intermediate_size=None))
    assert retnet["mlp_dim"] == 2816


@pytest.mark.parametrize("name, changes, message", [
    ("rwkv7", dict(value_dim=[128, 64, 64]), "value_dim"),
    ("rwkv7", dict(hidden_act="relu"), "hidden_act='relu'"),
    ("rwkv6", dict(norm_bias=False), "norm_bias=False"),
    ("rwkv6", dict(num_heads=5), "not a multiple of num_heads=5"),
    ("rwkv6", dict(attn={"layers": [1]}), "attn="),
    ("retnet", dict(num_kv_heads=2), "num_kv_heads=2"),
    ("retnet", dict(feature_map="relu"), "feature_map='relu'"),
    ("retnet", dict(fuse_norm=False), "fuse_norm=False"),
])
def test_fla_configs_tessera_cannot_run_are_refused(name, changes, message):
    with pytest.raises(ConversionError, match=message):
        FAMILIES[name].model_fields(_fla(name, **changes))
