"""ViT (``ViTForImageClassification``): the import classifies the golden images as transformers
does and is a working vit config (task classify, class names kept); export writes HF's config
back and refuses what HF ViT cannot express. Tensor round trips and checkpoint errors are in
test_roundtrip.py and test_errors.py with the other families."""

import json
import os
import re

import jax
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.configs.base import base_config
from tessera.convert import ConversionError, export_hf, save_hf
from tessera.convert.configs import hf_config, read_hf_config, tessera_config
from tessera.convert.families.vit import Labels, activation_to_hf, activation_to_ours
from tests.convert.helpers import (
    copy_fixture,
    edit_config,
    fixture,
    forward,
    hf_tensors,
    nhwc,
    read,
    reference,
    run_cli,
)

ONE = jax.devices()[:1]
CLASSES = ("circle", "square", "triangle", "star", "cross")  # tools/make_golden.py CLASS_NAMES

# The HF config keys ViTForImageClassification's math reads, and what export writes for them.
MATH_KEYS = (
    "architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "layer_norm_eps", "image_size", "patch_size",
    "num_channels", "qkv_bias", "id2label", "label2id", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "dtype",
)


@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_transformers(scan):
    ref = reference("vit")
    logits = forward(read(fixture("vit"), **{"model.scan_layers": scan}))
    got = logits(nhwc(ref["pixel_values"]))
    np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=0)
    assert np.argmax(got, -1).tolist() == np.argmax(ref["logits"], -1).tolist()


def test_imported_config_is_a_vit_config():
    config = tessera_config(read_hf_config(fixture("vit")))
    m = config.model
    assert (m.name, m.family, m.pool, m.pos_embedding, m.norm, m.mlp_activation) == (
        "vit", "vit", "cls", "learned", "layernorm", "gelu")
    assert not m.causal and not m.rope and m.qkv_bias and m.attn_out_bias and m.mlp_bias
    assert (m.image_size, m.patch_size, m.num_channels) == (32, 8, 3)
    assert (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim) == (
        32, 2, 4, 4, 8, 64)
    assert m.num_classes == 5 and m.class_names == CLASSES
    assert m.norm_eps == 1e-12 and m.dropout == 0.1
    assert m.dtype == m.param_dtype == "float32"  # the checkpoint's dtype, computed in
    packaged = load_config("vit")  # task, data and optimizer come from the packaged vit config
    assert config.train.task == "classify" and config.data == packaged.data
    assert config.optim == packaged.optim
    with pytest.raises(AttributeError, match="locked"):
        config.model.num_layer = 3  # locked like any config: a typo is an error


def test_export_writes_the_hf_config(tmp_path):
    model = read(fixture("vit"))
    source = read_hf_config(fixture("vit"))
    save_hf(model.params, model.config, str(tmp_path / "kept"), source=source)
    kept = read_hf_config(str(tmp_path / "kept"))
    assert {k: v for k, v in kept.items() if k != "torch_dtype"} == {
        k: v for k, v in source.items() if k != "transformers_version"}
    save_hf(model.params, model.config, str(tmp_path / "fresh"))  # no source: the family's keys
    fresh = read_hf_config(str(tmp_path / "fresh"))
    assert {k: fresh[k] for k in MATH_KEYS} == {k: source[k] for k in MATH_KEYS}
    assert "encoder_stride" not in fresh  # HF's default applies


@pytest.mark.parametrize("key, value, message", [
    ("pool", "map", "model.pool='map' has no equivalent in this Hugging Face family (it needs "
     "'cls')"),
    ("pool", "gap", "model.pool='gap' has no equivalent"),
    ("pos_embedding", "sincos2d", "model.pos_embedding='sincos2d' has no equivalent"),
    ("norm", "rmsnorm", "model.norm='rmsnorm' has no equivalent"),
    ("mlp_activation", "swiglu", "model.mlp_activation='swiglu' has no equivalent"),
    ("attn_out_bias", False, "model.attn_out_bias=False has no equivalent"),
    ("mlp_bias", False, "model.mlp_bias=False has no equivalent"),
    ("num_kv_heads", 2, "model.num_kv_heads=2 != model.num_heads=4 has no equivalent"),
    ("class_names", ("a", "b"), "model.class_names has 2 names for model.num_classes=5"),
])
def test_export_refuses_what_hf_vit_cannot_express(key, value, message, tmp_path):
    config = tessera_config(read_hf_config(fixture("vit")))
    config.model[key] = value
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=re.escape(f"export as vit: {message}")):
        save_hf({}, config, str(out))  # the config is checked before any tensor
    assert not out.exists()


def test_config_parts():
    assert activation_to_ours("gelu_new") == activation_to_ours("gelu_pytorch_tanh") == (
        "gelu_tanh")
    assert activation_to_hf("gelu_tanh") == "gelu_pytorch_tanh"
    assert activation_to_hf("gelu") == "gelu"
    labels = Labels()
    assert labels.from_hf({}) == {"num_classes": 2, "class_names": ("LABEL_0", "LABEL_1")}
    assert labels.from_hf({"num_labels": 3})["class_names"][2] == "LABEL_2"
    with pytest.raises(ConversionError, match=r"id2label has ids \[0, 2\]; expected 0 .. K - 1"):
        labels.from_hf({"id2label": {"0": "a", "2": "b"}})
    config = base_config()
    config.model.update(num_classes=3, class_names=())
    assert labels.to_hf(config.model)["label2id"] == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}


def test_attention_dropout_is_dropped_with_a_warning(tmp_path):
    path = copy_fixture("vit", str(tmp_path / "vit"))
    edit_config(path, attention_probs_dropout_prob=0.1)
    with pytest.warns(UserWarning, match="attention_probs_dropout_prob=0.1 is dropped: tessera "
                      "has no dropout on attention probabilities"):
        config = tessera_config(read_hf_config(path))
    assert hf_config(config, dtype="float32")["attention_probs_dropout_prob"] == 0.0


def test_cli_import_writes_a_vit_workdir(tmp_path):
    """``python -m tessera.convert import``: config.py loads the imported config (class names
    in config.json), and the checkpoint exports back to the fixture's tensors."""
    work = str(tmp_path / "work")
    proc = run_cli("import", f"--hf_dir={fixture('vit')}", f"--workdir={work}")
    assert proc.returncode == 0, proc.stderr
    assert "imported vit" in proc.stdout and "tokenizer" not in proc.stdout
    assert sorted(os.listdir(work)) == [
        "checkpoints", "config.json", "config.py", "hf_config.json", "imported_config.json"]
    config = load_config(os.path.join(work, "config.py"))
    assert config == tessera_config(read_hf_config(fixture("vit")))
    with open(os.path.join(work, "config.json")) as f:
        assert json.load(f)["model"]["class_names"] == list(CLASSES)
    out = str(tmp_path / "hf")
    export_hf(work, out, devices=ONE)
    original, exported = hf_tensors(fixture("vit")), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert read_hf_config(out)["id2label"] == read_hf_config(fixture("vit"))["id2label"]
