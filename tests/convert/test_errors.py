"""Bad input: one clear error naming the problem, raised before anything is written."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from tessera.convert import ConversionError, export_hf, import_hf, read_hf, save_hf
from tessera.convert.safetensors_io import SINGLE_FILE
from tests.convert.helpers import copy_fixture, edit_config, fixture, hf_tensors, read

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE = jax.devices()[:1]


def rewrite(path: str, change) -> None:
    """Rewrite a single-file fixture's tensors through ``change(dict)``."""
    tensors = hf_tensors(path)
    change(tensors)
    save_file(tensors, os.path.join(path, SINGLE_FILE))


def bad_dir(tmp_path, name="qwen2", config=None, tensors=None, remove=()) -> str:
    path = copy_fixture(name, str(tmp_path / name))
    if config:
        edit_config(path, **config)
    if tensors:
        rewrite(path, tensors)
    for f in remove:
        os.remove(os.path.join(path, f))
    return path


def set_value(name, index, value):
    def change(tensors):
        tensors[name][index] = value

    return change


CASES = {
    "unsupported model_type": (
        dict(config={"model_type": "gpt2"}),
        # diffusers' class names (capitalised) sort first
        "unsupported model_type 'gpt2'; supported: .*deepseek_v2, deepseek_v3, llama, mamba, "
        "mamba2, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, retnet, rwkv6, rwkv7, vit",
    ),
    "missing shard": (
        dict(name="llama", remove=["model-00002-of-00002.safetensors"]),
        "missing shard model-00002-of-00002.safetensors",
    ),
    "no checkpoint": (
        dict(remove=[SINGLE_FILE]),
        "no model.safetensors or model.safetensors.index.json",
    ),
    "missing tensor": (
        dict(tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.bias")),
        "missing tensor model.layers.1.self_attn.k_proj.bias",
    ),
    "unexpected tensor": (
        dict(tensors=lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(32)})),
        "unexpected tensor model.layers.0.self_attn.o_proj.bias",
    ),
    "shape mismatch": (
        dict(config={"intermediate_size": 48}),
        r"shape mismatch for tensor model.layers.0.mlp.gate_proj.weight: the checkpoint has "
        r"\(64, 32\), config.json implies \(48, 32\)",
    ),
    "activation": (dict(config={"hidden_act": "gelu"}), "hidden_act='gelu' is not supported"),
    "rope type": (
        dict(config={"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}),
        "rope_type 'longrope' is not supported",
    ),
    "yarn attention factor": (
        dict(config={"rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                      "attention_factor": 0.5}}),
        "RoPE parameter attention_factor=0.5 is not supported",
    ),
    "missing key": (dict(config={"hidden_size": None}), "config.json has no 'hidden_size'"),
    "vit missing tensor": (
        dict(name="vit", tensors=lambda t: t.pop("vit.encoder.layer.1.output.dense.bias")),
        "missing tensor vit.encoder.layer.1.output.dense.bias",
    ),
    "vit patch size": (
        dict(name="vit", config={"patch_size": 16}),
        r"shape mismatch for tensor vit.embeddings.patch_embeddings.projection.weight: the "
        r"checkpoint has \(32, 3, 8, 8\), config.json implies \(32, 3, 16, 16\)",
    ),
    "vit labels": (
        dict(name="vit", config={"id2label": {"0": "cat", "1": "dog"}}),
        r"shape mismatch for tensor classifier.weight: the checkpoint has \(5, 32\), "
        r"config.json implies \(2, 32\)",
    ),
    "vit without qkv bias": (
        dict(name="vit", config={"qkv_bias": False}),
        r"unexpected tensor vit.encoder.layer.0.attention.attention.key.bias in .* \(and 5 "
        r"more\): model_type vit with this config has no parameter for it",
    ),
    "vit activation": (
        dict(name="vit", config={"hidden_act": "relu"}),
        "model_type vit: config.json hidden_act='relu' is not supported",
    ),
    "vit heads": (
        dict(name="vit", config={"num_attention_heads": 5}),
        "hidden_size=32 is not divisible by num_attention_heads=5",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_is_a_clear_error(case, tmp_path):
    spec, message = CASES[case]
    path = bad_dir(tmp_path, **spec)
    with pytest.raises(ConversionError, match=message):
        read_hf(path, devices=ONE)


def test_overflow_names_the_tensor(tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = bad_dir(tmp_path, tensors=set_value(name, (3, 5), 1e5))
    with pytest.raises(ConversionError, match=rf"tensor {name}: value 100000.0 at index \(3, 5\) "
                       "overflows float16"):
        read_hf(path, dtype="float16", devices=ONE)
    model = read(path)  # float32 holds it; exporting as float16 is refused the same way
    with pytest.raises(ConversionError, match=rf"tensor {name}: value 100000.0 .* float16"):
        save_hf(model.params, model.config, str(tmp_path / "out"), dtype="float16")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_bad_dtype_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="'int8' is not a floating-point dtype"):
        read_hf(fixture("qwen2"), dtype="int8", devices=ONE)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_hf(str(tmp_path / "nowhere"), devices=ONE)


def test_export_refusals(tmp_path):
    model = read(fixture("llama"))
    config = model.config
    config.model.qkv_bias = True  # llama in HF has no qkv-only bias
    with pytest.raises(ConversionError, match=r"model.qkv_bias=True has no equivalent"):
        save_hf(model.params, config, str(tmp_path / "a"))
    config = model.config.copy_and_resolve_references()
    config.model.logit_soft_cap = 30.0
    with pytest.raises(ConversionError, match=r"logit_soft_cap has no key .* drop it"):
        save_hf(model.params, config, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        save_hf(model.params, model.config, str(tmp_path / "full"))
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="workdir .* does not exist"):
        export_hf(str(tmp_path / "nowhere"), str(tmp_path / "b"))


def test_import_refuses_a_trained_workdir(tmp_path):
    work = str(tmp_path / "work")
    import_hf(fixture("qwen3"), work, devices=ONE)
    before = sorted(os.listdir(work))
    with pytest.raises(ConversionError, match="already has checkpoints"):
        import_hf(fixture("qwen3"), work, devices=ONE)
    assert sorted(os.listdir(work)) == before


def test_cli_error_is_one_line(tmp_path):
    path = bad_dir(tmp_path, config={"model_type": "gpt2"})
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.convert", "import", f"--hf_dir={path}",
         f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tessera: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search("unsupported model_type 'gpt2'", errors[0])
    assert not os.path.exists(tmp_path / "w")
    json.loads((tmp_path / "qwen2" / "config.json").read_text())  # input untouched
