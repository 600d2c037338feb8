"""Export then re-import is bit-exact, and the exported checkpoint is the HF one, tensor for
tensor (that transformers loads it is checked by tools/make_golden.py --check-export)."""

import jax
import ml_dtypes
import numpy as np
import pytest

from tessera.convert import export_hf, import_hf, save_hf
from tessera.convert.configs import read_hf_config, tessera_config
from tessera.convert.safetensors_io import INDEX_FILE
from tests.convert.helpers import NAMES, fixture, hf_tensors, read


def assert_same_params(a, b):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("name", NAMES)
def test_export_reimport_bit_exact(name, tmp_path):
    model = read(fixture(name))
    out = str(tmp_path / "hf")
    files = save_hf(model.params, model.config, out)
    assert files == ["config.json", "model.safetensors"]
    assert_same_params(read(out).params, model.params)
    original, exported = hf_tensors(fixture(name)), hf_tensors(out)
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    again = tessera_config(read_hf_config(out))
    assert again.model == tessera_config(read_hf_config(fixture(name))).model


def test_workdir_export_sharded_and_bfloat16(tmp_path):
    """import_hf -> export_hf through the checkpoint, as shards + index; a bfloat16 export
    re-imports bit-exactly as bfloat16, and as float32 to the bfloat16 values."""
    work = str(tmp_path / "work")
    import_hf(fixture("qwen2"), work, devices=jax.devices()[:1])
    out = str(tmp_path / "hf")
    step, files = export_hf(work, out, max_shard_bytes=50_000)
    assert step == 0 and INDEX_FILE in files and len(files) > 3
    original, exported = hf_tensors(fixture("qwen2")), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)

    bf16 = str(tmp_path / "bf16")
    export_hf(work, bf16, dtype="bfloat16")
    tensors = hf_tensors(bf16)
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert read_hf_config(bf16)["dtype"] == "bfloat16"
    as_bf16 = read(bf16, dtype="bfloat16")
    again = str(tmp_path / "bf16_again")
    save_hf(as_bf16.params, as_bf16.config, again, dtype="bfloat16")
    for key, value in hf_tensors(again).items():
        np.testing.assert_array_equal(value.view(np.uint16), tensors[key].view(np.uint16))
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32)),
        read(bf16).params,
        as_bf16.params,
    )
