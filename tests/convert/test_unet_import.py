"""diffusers' ``UNet2DConditionModel``: the import predicts the golden noise as diffusers does
(tests/fixtures/diffusers/unet: linear projections, attention on the last level, per-level
heads; unet_conv: 1x1-conv projections, attention on the first level, two transformer layers,
one head count, sin-before-cos features with a shift), export -> re-import is bit-exact and
writes diffusers' tensors and config back, and configs tessera cannot run are refused with one
line."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from tessera.configs.base import base_config
from tessera.convert import ConversionError, load_hf, save_hf
from tessera.convert.configs import read_hf_config, tessera_config
from tessera.convert.families.unet import Structure
from tests.convert.helpers import F32, TESTS, hf_tensors, read
from tests.convert.test_roundtrip import assert_same_params

FIXTURES = os.path.join(TESTS, "fixtures", "diffusers")
NAMES = ("unet", "unet_conv")
ONE = jax.devices()[:1]


def fixture(name):
    return os.path.join(FIXTURES, name)


def reference(name):
    return dict(np.load(os.path.join(fixture(name), "reference.npz")))


@pytest.mark.parametrize("name", NAMES)
def test_output_matches_diffusers(name):
    config, model = load_hf(fixture(name), overrides=F32, devices=ONE)
    ref = reference(name)
    got = jax.jit(lambda x, t, c: model(x, t, context=c))(
        ref["sample"], ref["timesteps"], ref["encoder_hidden_states"])
    scale = np.abs(ref["output"]).max()
    np.testing.assert_allclose(got, ref["output"], atol=1e-5 * scale, rtol=0)


def test_imported_configs():
    m = tessera_config(read_hf_config(fixture("unet"))).model
    assert (m.name, m.family, m.image_size, m.num_channels, m.num_classes) == (
        "unet", "UNet2DConditionModel", 8, 4, 0)
    u = m.unet
    assert (u.block_out_channels, u.attention_levels, u.num_attention_heads) == (
        (8, 16), (False, True), (2, 4))
    assert (u.layers_per_block, u.transformer_layers, u.cross_attention_dim) == (1, 1, 8)
    assert u.use_linear_projection and (u.norm_groups, u.norm_eps) == (4, 1e-5)
    assert (u.flip_sin_to_cos, u.freq_shift) == (True, 0)
    u = tessera_config(read_hf_config(fixture("unet_conv"))).model.unet
    assert (u.attention_levels, u.num_attention_heads, u.transformer_layers) == (
        (True, False), (2, 2), 2)
    assert not u.use_linear_projection and (u.flip_sin_to_cos, u.freq_shift) == (False, 1)


@pytest.mark.parametrize("name", NAMES)
def test_export_reimport_bit_exact(name, tmp_path):
    model = read(fixture(name), devices=ONE)
    out = str(tmp_path / "hf")
    files = save_hf(model.params, model.config, out)
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_same_params(read(out, devices=ONE).params, model.params)
    original, exported = hf_tensors(fixture(name)), hf_tensors(out)
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    source, fresh = read_hf_config(fixture(name)), read_hf_config(out)
    for key in sorted(set(fresh) - {"dtype", "torch_dtype"}):  # each key as diffusers wrote it
        want = source[key]
        if key == "attention_head_dim" and isinstance(want, int):  # export writes one per level
            want = [want] * len(source["block_out_channels"])
        assert fresh[key] == want, key
    assert tessera_config(fresh).model == tessera_config(source).model


def test_export_refuses_class_labels(tmp_path):
    config = tessera_config(read_hf_config(fixture("unet")))
    config.model.num_classes = 10
    with pytest.raises(ConversionError, match=re.escape(
            "export as UNet2DConditionModel: model.num_classes=10 has no equivalent in this "
            "Hugging Face family (it needs 0)")):
        save_hf({}, config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, message", [
    (dict(class_embed_type="timestep"), "class_embed_type='timestep' is not supported"),
    (dict(addition_embed_type="text_time"), "addition_embed_type='text_time' is not supported"),
    (dict(time_cond_proj_dim=8), "time_cond_proj_dim=8 is not supported"),
    (dict(dual_cross_attention=True), "dual_cross_attention=True is not supported"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type="),
    (dict(down_block_types=["DownBlock2D", "SimpleCrossAttnDownBlock2D"]),
     "down_block_types=['DownBlock2D', 'SimpleCrossAttnDownBlock2D'] is not supported"),
    (dict(up_block_types=["UpBlock2D", "UpBlock2D"]),
     "up_block_types=['UpBlock2D', 'UpBlock2D'] is not supported (tessera mirrors "
     "down_block_types: ['CrossAttnUpBlock2D', 'UpBlock2D'])"),
    (dict(layers_per_block=[1, 2]), "layers_per_block=[1, 2] is not supported"),
    (dict(attention_head_dim=[2, 4, 8]), "attention_head_dim=[2, 4, 8] is not an int or a list"),
    (dict(out_channels=8), "in_channels=4 != out_channels=8 is not supported"),
    (dict(sample_size=[8, 16]), "sample_size=[8, 16] is not supported (square inputs only)"),
    (dict(block_out_channels=[8] * 7), "block_out_channels has 7 levels"),
])
def test_unsupported_configs_are_refused_in_one_line(changes, message, tmp_path):
    path = str(tmp_path / "unet")
    shutil.copytree(fixture("unet"), path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConversionError, match=re.escape(message)) as err:
        load_hf(path, overrides=F32, devices=ONE)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("model_type UNet2DConditionModel: config.json ")


def test_heads_naming_quirk():
    """SD configs keep the heads in attention_head_dim (num_attention_heads null); a set
    num_attention_heads wins; export writes attention_head_dim."""
    hf = dict(block_out_channels=[320, 640], down_block_types=["CrossAttnDownBlock2D"] * 2,
              up_block_types=["CrossAttnUpBlock2D"] * 2)
    part = Structure()
    assert part.from_hf({**hf, "attention_head_dim": 8})["unet.num_attention_heads"] == (8, 8)
    got = part.from_hf({**hf, "attention_head_dim": 64, "num_attention_heads": [5, 10]})
    assert got["unet.num_attention_heads"] == (5, 10)
    model = base_config().model
    written = part.to_hf(model)
    assert written["attention_head_dim"] == [5, 10, 20, 20]
    assert written["num_attention_heads"] is None
    assert written["down_block_types"][-1] == "DownBlock2D"
    assert written["up_block_types"][0] == "UpBlock2D"
