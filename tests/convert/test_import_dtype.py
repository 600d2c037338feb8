"""An import keeps the checkpoint's dtype for its parameters and computes in it (as transformers
does), unless ``--dtype`` / ``--compute_dtype`` / ``--set=model.dtype=`` say otherwise."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from tessera.convert import ConversionError, import_hf
from tessera.convert.configs import checkpoint_dtype, import_dtypes, read_hf_config, tessera_config
from tessera.serve.loading import load_decoder
from tessera.serve.sampling import SamplingParams
from tests.convert.helpers import copy_fixture, edit_config, fixture, hf_tensors, run_cli

ONE = jax.devices()[:1]
LLAMA3 = read_hf_config(fixture("llama3"))  # a float32 checkpoint ("dtype": "float32")


def hf_with(**dtype_keys):
    """The llama3 fixture's config with its dtype keys replaced by ``dtype_keys``."""
    hf = {k: v for k, v in LLAMA3.items() if k not in ("dtype", "torch_dtype")}
    return {**hf, **dtype_keys}


# (config.json dtype keys, tessera_config kwargs) -> (model.param_dtype, model.dtype)
CASES = {
    "f32 checkpoint": ({"dtype": "float32"}, {}, ("float32", "float32")),
    "bf16 checkpoint": ({"dtype": "bfloat16"}, {}, ("bfloat16", "bfloat16")),
    "older torch_dtype": ({"torch_dtype": "float16"}, {}, ("float16", "float16")),
    "torch. prefix": ({"torch_dtype": "torch.bfloat16"}, {}, ("bfloat16", "bfloat16")),
    "dtype wins over torch_dtype": (
        {"dtype": "bfloat16", "torch_dtype": "float32"}, {}, ("bfloat16", "bfloat16")),
    "no dtype: float32": ({}, {}, ("float32", "float32")),
    "auto: float32": ({"dtype": "auto"}, {}, ("float32", "float32")),
    "--dtype sets both": ({"dtype": "bfloat16"}, {"dtype": "float32"}, ("float32", "float32")),
    "--compute_dtype": ({"dtype": "float32"}, {"compute_dtype": "bfloat16"},
                        ("float32", "bfloat16")),
    "--set model.dtype": ({"dtype": "float32"}, {"overrides": {"model.dtype": "bfloat16"}},
                          ("float32", "bfloat16")),
    "--set model.param_dtype": ({"dtype": "bfloat16"},
                                {"overrides": {"model.param_dtype": "float32"}},
                                ("float32", "float32")),
}


@pytest.mark.parametrize("case", CASES)
def test_param_and_compute_dtypes(case):
    keys, kwargs, want = CASES[case]
    m = tessera_config(hf_with(**keys), **kwargs).model
    assert (m.param_dtype, m.dtype) == want


def test_dtype_errors():
    with pytest.raises(ConversionError, match=r"config.json has dtype='int8', not a "
                       r"floating-point dtype .* pass --dtype=float32"):
        checkpoint_dtype(hf_with(dtype="int8"))
    # An explicit --dtype does not need the checkpoint's dtype.
    assert tessera_config(hf_with(dtype="int8"), dtype="bfloat16").model.dtype == "bfloat16"
    with pytest.raises(ValueError, match="--compute_dtype: dtype 'int32' is not a floating"):
        tessera_config(LLAMA3, compute_dtype="int32")
    with pytest.raises(ValueError, match="--dtype: unknown dtype 'bf17'"):
        tessera_config(LLAMA3, dtype="bf17")
    with pytest.raises(ValueError, match="--compute_dtype=bfloat16 and --set=model.dtype=float32 "
                       "disagree"):
        import_dtypes(LLAMA3, compute_dtype="bfloat16", overrides={"model.dtype": "float32"})
    with pytest.raises(ValueError, match="--set=model.dtype: dtype 'int8' is not a floating"):
        tessera_config(LLAMA3, overrides={"model.dtype": "int8"})


@pytest.fixture(scope="module")
def bf16_workdir(tmp_path_factory):
    """The llama3 fixture's float32 weights under a config.json that says bfloat16, imported."""
    root = tmp_path_factory.mktemp("bf16")
    src = copy_fixture("llama3", str(root / "hf"))
    edit_config(src, dtype="bfloat16", torch_dtype="bfloat16")
    notes = []
    work = str(root / "work")
    config = import_hf(src, work, devices=ONE, log=notes.append)
    return src, work, config, notes


def test_bf16_checkpoint_imports_computing_in_bf16(bf16_workdir):
    src, work, config, notes = bf16_workdir
    assert (config.model.param_dtype, config.model.dtype) == ("bfloat16", "bfloat16")
    stored = json.load(open(os.path.join(work, "config.json")))["model"]
    assert (stored["param_dtype"], stored["dtype"]) == ("bfloat16", "bfloat16")
    assert notes[0].startswith(
        "dtype: model.param_dtype=bfloat16 (the checkpoint's config.json dtype), "
        "model.dtype=bfloat16 (compute, the parameter dtype); --compute_dtype=float32")

    # The workdir decodes (serve/loading restores the bfloat16 parameters as stored).
    decoder, step = load_decoder(config, work, devices=ONE)
    embed = decoder.params["embed"]["embedding"]
    assert step == 0 and embed.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        np.asarray(embed), hf_tensors(src)["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16))
    (completion,) = decoder.generate([[1, 2, 3]], SamplingParams(), 4, stop_tokens=())
    assert len(completion.tokens) == 4


def test_cli_compute_dtype_flag(tmp_path):
    work = str(tmp_path / "work")
    proc = run_cli("import", f"--hf_dir={fixture('llama3')}", f"--workdir={work}",
                   "--compute_dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert ("dtype: model.param_dtype=float32 (the checkpoint's config.json dtype), "
            "model.dtype=bfloat16 (compute, --compute_dtype)") in proc.stdout
    stored = json.load(open(os.path.join(work, "config.json")))["model"]
    assert (stored["param_dtype"], stored["dtype"]) == ("float32", "bfloat16")
