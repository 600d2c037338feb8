"""diffusers' AutoencoderKL: the import encodes and decodes the golden arrays as diffusers does
(tests/fixtures/diffusers/vae, tools/make_diffusers_golden.py), export then re-import is
bit-exact (for the fixture and for a tessera-made vae config), and configs diffusers' VAE math
does not match are refused in one line."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.convert import ConversionError, read_hf, save_hf
from tessera.convert.configs import read_hf_config
from tessera.models.create import ModelSpec
from tests.convert.helpers import TESTS, edit_config, hf_tensors

FIXTURE = os.path.join(TESTS, "fixtures", "diffusers", "vae")
ONE = jax.devices()[:1]
F32 = {"model.dtype": "float32"}


@pytest.fixture(scope="module")
def imported():
    return read_hf(FIXTURE, overrides=F32, devices=ONE)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


def test_imported_config(imported):
    config = imported.config
    m = config.model
    assert (m.name, m.family, m.image_size, m.num_channels) == ("vae", "AutoencoderKL", 16, 3)
    v = m.vae
    assert tuple(v.block_out_channels) == (8, 16) and v.layers_per_block == 2
    assert (v.latent_channels, v.norm_groups, v.norm_eps, v.mid_attention) == (4, 4, 1e-6, True)
    assert (v.scaling_factor, v.shift_factor) == (0.18215, 0.0)  # null shift -> 0
    assert config.train.task == "vae" and config.data == load_config("vae").data


def test_encode_and_decode_match_diffusers(imported, reference):
    @jax.jit
    def run(params, images, latents):
        model = imported.spec.merge(params)
        return (*model.encode(images), model.decode(latents))

    mean, logvar, decoded = run(imported.params, reference["images"], reference["latents"])
    np.testing.assert_allclose(mean, reference["mean"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(logvar, reference["logvar"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(decoded, reference["decoded"], rtol=0, atol=2e-5)


def test_export_then_import_is_bit_exact(imported, tmp_path):
    source = read_hf_config(FIXTURE)
    save_hf(imported.params, imported.config, str(tmp_path / "out"), source=source)
    assert os.path.isfile(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    original, exported = hf_tensors(FIXTURE), hf_tensors(str(tmp_path / "out"))
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    again = read_hf(str(tmp_path / "out"), overrides=F32, devices=ONE)
    jax.tree.map(np.testing.assert_array_equal, again.params, imported.params)
    written = read_hf_config(str(tmp_path / "out"))
    assert {k: written[k] for k in source if not k.startswith("_")} == {
        k: v for k, v in source.items() if not k.startswith("_")}


def test_tessera_vae_exports_as_diffusers(tmp_path):
    """vae:tiny (three levels, one block each) with a shift: fresh keys, and back bit-exact."""
    config = load_config("vae:tiny,model.vae.shift_factor=0.5")
    spec = ModelSpec(config.model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), spec.shapes)
    save_hf(params, config, str(tmp_path / "out"))
    hf = read_hf_config(str(tmp_path / "out"))
    assert hf["_class_name"] == "AutoencoderKL" and hf["block_out_channels"] == [32, 64, 64]
    assert hf["down_block_types"] == ["DownEncoderBlock2D"] * 3 and hf["shift_factor"] == 0.5
    assert (hf["layers_per_block"], hf["norm_num_groups"], hf["sample_size"]) == (1, 1, 32)
    names = hf_tensors(str(tmp_path / "out"))
    assert "decoder.up_blocks.2.resnets.1.conv2.weight" in names
    assert "encoder.down_blocks.1.downsamplers.0.conv.weight" in names
    assert names["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)
    again = read_hf(str(tmp_path / "out"), overrides=F32, devices=ONE)
    assert again.config.model.vae.shift_factor == 0.5
    jax.tree.map(np.testing.assert_array_equal, again.params, params)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
         r"down_block_types=\['DownEncoderBlock2D', 'AttnDownEncoderBlock2D'\] is not supported"),
        (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types=.* is not supported"),
        (dict(act_fn="gelu"), "act_fn='gelu' is not supported"),
        (dict(out_channels=4), "in_channels=3 != out_channels=4 is not supported"),
        (dict(use_quant_conv=False), "use_quant_conv=False is not supported"),
        (dict(sample_size=[16, 32]), r"sample_size=\[16, 32\] is not supported"),
        (dict(layers_per_block=1),
         r"unexpected tensor \S+\.resnets\.\d\.\S+ .* has no parameter for it"),
    ],
)
def test_unsupported_configs_are_one_line_errors(tmp_path, changes, message):
    path = str(tmp_path / "vae")
    shutil.copytree(FIXTURE, path)
    edit_config(path, **changes)
    with pytest.raises(ConversionError, match=message) as info:
        read_hf(path, overrides=F32, devices=ONE)
    assert "\n" not in str(info.value)


def test_latent_normalisation_stats_are_dropped_with_a_warning(tmp_path):
    path = str(tmp_path / "vae")
    shutil.copytree(FIXTURE, path)
    edit_config(path, latents_mean=[0.0] * 4)
    with pytest.warns(UserWarning, match="latents_mean=.* is dropped"):
        read_hf(path, overrides=F32, devices=ONE)
