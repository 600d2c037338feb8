"""DiT (diffusers ``DiTTransformer2DModel``, and ``Transformer2DModel`` with adaLN-Zero): the
import denoises the golden latents as diffusers does, scanned or unrolled; export writes the
same tensors and config back and re-imports bit-exactly; the embedder diffusers copies into each
block must be one; configs that are not diffusers' DiT are refused in one line."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from tessera.convert import ConversionError, save_hf
from tessera.convert.configs import read_hf_config, tessera_config
from tessera.convert.safetensors_io import write_safetensors
from tessera.sharding import use_mesh
from tests.convert.helpers import TESTS, edit_config, hf_tensors, read

FIXTURE = os.path.join(TESTS, "fixtures", "diffusers", "dit")
REFERENCE = dict(np.load(os.path.join(FIXTURE, "reference.npz")))
WEIGHTS = "diffusion_pytorch_model.safetensors"


def denoise(model, timesteps=REFERENCE["timesteps"]):
    """The imported model's output on the golden inputs (NHWC, float32)."""

    @jax.jit
    def run(params, x, t, labels):
        with use_mesh(model.mesh, model.rules):
            return model.spec.merge(params)(x, t, labels=labels)

    return np.asarray(run(model.params, REFERENCE["sample"], timesteps, REFERENCE["class_labels"]))


@pytest.fixture(scope="module")
def imported():
    return read(FIXTURE)


def copy(tmp_path, drop=(), **changes):
    """The fixture copied, its config.json with ``changes`` and without the keys ``drop``."""
    path = str(tmp_path / "dit")
    shutil.copytree(FIXTURE, path)
    edit_config(path, **changes)
    with open(os.path.join(path, "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if k not in drop}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def test_output_matches_diffusers(imported):
    np.testing.assert_allclose(denoise(imported), REFERENCE["output"], atol=5e-5, rtol=0)
    float_t = REFERENCE["timesteps"].astype(np.float32)
    np.testing.assert_allclose(denoise(imported, float_t), REFERENCE["output"], atol=5e-5, rtol=0)


def test_unrolled_import_matches_diffusers():
    model = read(FIXTURE, **{"model.scan_layers": False})
    np.testing.assert_allclose(denoise(model), REFERENCE["output"], atol=5e-5, rtol=0)


def test_imported_config():
    m = tessera_config(read_hf_config(FIXTURE)).model
    assert (m.name, m.family) == ("dit", "DiTTransformer2DModel")
    assert (m.image_size, m.patch_size, m.num_channels, m.num_classes) == (8, 2, 4, 10)
    assert (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim) == (
        32, 2, 2, 2, 16, 128)
    assert m.dit.learn_sigma and m.dit.freq_dim == 256 and m.norm_eps == 1e-5


def test_export_round_trip_is_bit_exact(imported, tmp_path):
    out = str(tmp_path / "hf")
    save_hf(imported.params, imported.config, out, source=read_hf_config(FIXTURE))
    assert sorted(os.listdir(out)) == ["config.json", WEIGHTS]
    original, exported = hf_tensors(FIXTURE), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    again = read(out)
    jax.tree.map(np.testing.assert_array_equal, again.params, imported.params)
    fresh = str(tmp_path / "fresh")  # without the source config: the family's keys alone
    save_hf(imported.params, imported.config, fresh)
    source, written = read_hf_config(FIXTURE), read_hf_config(fresh)
    keys = set(source) - {"_diffusers_version", "dropout", "norm_num_groups", "upcast_attention"}
    assert {k: written[k] for k in keys} == {k: source[k] for k in keys}
    assert "dtype" not in written and "torch_dtype" not in written  # diffusers refuses them


def test_transformer_2d_dit_config_imports(imported, tmp_path):
    """The hub's DiT checkpoints name their class Transformer2DModel (whose defaults differ:
    the DiT keys are spelt out); same tensors, same model, exported under its own class."""
    path = copy(tmp_path, _class_name="Transformer2DModel", cross_attention_dim=None,
                num_vector_embeds=None, only_cross_attention=False, use_linear_projection=False)
    model = read(path)
    assert model.config.model.family == "Transformer2DModel"
    jax.tree.map(np.testing.assert_array_equal, model.params, imported.params)
    out = str(tmp_path / "hf")
    save_hf(model.params, model.config, out)
    hf = read_hf_config(out)
    assert hf["_class_name"] == "Transformer2DModel" and hf["norm_type"] == "ada_norm_zero"
    assert hf["interpolation_scale"] == 1 and hf["cross_attention_dim"] is None


def test_differing_embedder_copies_are_refused(tmp_path):
    path = copy(tmp_path)
    tensors = hf_tensors(path)
    name = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    tensors[name] = tensors[name] + 1.0
    os.remove(os.path.join(path, WEIGHTS))
    write_safetensors(path, sorted(tensors.items()), 10**9, stem=WEIGHTS.split(".")[0])
    want = (f"tensor {name} differs from transformer_blocks.0.norm1.emb.class_embedder."
            "embedding_table.weight: tessera shares one label_embedding across layers")
    with pytest.raises(ConversionError, match=re.escape(want)):
        read(path)


@pytest.mark.parametrize("changes, message", [
    (dict(activation_fn="gelu"), "config.json activation_fn='gelu' is not supported (tessera's "
     "DiT implements activation_fn='gelu-approximate')"),
    (dict(out_channels=5), "config.json out_channels=5 is not supported"),
    (dict(norm_elementwise_affine=True), "norm_elementwise_affine=True is not supported"),
    (dict(attention_bias=False), "attention_bias=False is not supported"),
    (dict(_class_name="Transformer2DModel", norm_type="layer_norm"),
     "Transformer2DModel with norm_type='layer_norm' is not a DiT"),
    (dict(_class_name="Transformer2DModel", drop=("norm_type", "patch_size")),
     "Transformer2DModel with norm_type='layer_norm' and no patch_size is not a DiT"),
    (dict(_class_name="Transformer2DModel", cross_attention_dim=64),
     "config.json cross_attention_dim=64 is not supported"),
    (dict(_class_name="Transformer2DModel", sample_size=128),
     "config.json interpolation_scale=2 is not supported"),
    (dict(_class_name="Transformer2DModel", drop=("attention_bias",)),
     "config.json attention_bias=False is not supported"),  # Transformer2DModel's default
])
def test_bad_configs_are_refused_in_one_line(changes, message, tmp_path):
    path = copy(tmp_path, **changes)
    with pytest.raises(ConversionError, match=re.escape(message)) as info:
        tessera_config(read_hf_config(path))
    assert "\n" not in str(info.value)


def test_hub_dit_xl_2_config():
    """facebook/DiT-XL-2-256's transformer/config.json (a Transformer2DModel) is DiT-XL/2."""
    hub = dict(
        _class_name="Transformer2DModel", activation_fn="gelu-approximate", attention_bias=True,
        attention_head_dim=72, cross_attention_dim=None, dropout=0.0, in_channels=4,
        norm_elementwise_affine=False, norm_num_groups=32, norm_type="ada_norm_zero",
        num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, num_vector_embeds=None,
        only_cross_attention=False, out_channels=8, patch_size=2, sample_size=32,
        upcast_attention=False, use_linear_projection=False,
    )
    m = tessera_config(hub).model
    assert (m.d_model, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim) == (
        1152, 28, 16, 72, 4608)
    assert (m.image_size, m.patch_size, m.num_channels, m.num_classes) == (32, 2, 4, 1000)
    assert m.dit.learn_sigma and m.dit.freq_dim == 256


@pytest.mark.parametrize("field, value, message", [
    ("mlp_dim", 100, "model.mlp_dim=100 has no equivalent in diffusers' DiT (it needs 4 x "
     "model.d_model = 128)"),
    ("head_dim", 8, "model.num_heads=2 x model.head_dim=8 != model.d_model=32"),
    ("prefix", ("attention:mlp",), "model.prefix=('attention:mlp',) has no equivalent"),
])
def test_export_refuses_what_diffusers_cannot_express(field, value, message, tmp_path):
    config = tessera_config(read_hf_config(FIXTURE))
    config.model[field] = value
    with pytest.raises(ConversionError, match=re.escape(message)):
        save_hf({}, config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
