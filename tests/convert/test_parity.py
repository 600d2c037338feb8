"""Import each golden HF model: logits and greedy continuation equal the transformers reference."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from tessera.convert import load_hf
from tessera.sharding import use_mesh
from tests.convert.helpers import F32, LM_NAMES, fixture, forward, greedy, read, reference


@pytest.mark.parametrize("name", LM_NAMES)
def test_logits_and_greedy_match_transformers(name):
    ref = reference(name)
    logits = forward(read(fixture(name)))
    np.testing.assert_allclose(logits(ref["tokens"]), ref["logits"], atol=1e-4, rtol=0)
    cont = greedy(logits, ref["prompt"], len(ref["greedy"]), ref["tokens"].shape[1])
    assert cont == ref["greedy"].tolist()


def test_sharded_load_on_fsdp_tensor_mesh():
    """The two-shard llama fixture onto a (data 2, fsdp 2, tensor 2) mesh: every parameter is
    placed with its ModelSpec sharding, values equal the one-device load, logits the reference."""
    ref = reference("llama")
    model = read(fixture("llama"), devices=jax.devices(), **{"mesh.fsdp": 2, "mesh.tensor": 2})
    assert dict(model.mesh.shape) == dict(data=2, fsdp=2, expert=1, sequence=1, tensor=2)
    want = model.spec.shardings(model.mesh, model.rules)
    jax.tree.map(lambda p, s: p.sharding.is_equivalent_to(s, p.ndim) or pytest.fail(str(s)),
                 model.params, want)
    wq = model.params["units"]["blocks"][0]["mixer"]["wq"]
    assert wq.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    single = read(fixture("llama"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 model.params, single.params)
    np.testing.assert_allclose(forward(model)(ref["tokens"]), ref["logits"], atol=1e-4, rtol=0)


def test_load_hf_returns_a_module_on_the_mesh():
    ref = reference("qwen2")
    config, model = load_hf(fixture("qwen2"), overrides=F32, devices=jax.devices()[:1])
    assert config.model.family == "qwen2" and config.model.qkv_bias
    assert config.model.param_dtype == "float32"

    @nnx.jit
    def run(model, tokens):
        return model(tokens).logits

    with use_mesh(model.embed.embedding[...].sharding.mesh, config.mesh.rules):
        out = run(model, ref["tokens"])
    np.testing.assert_allclose(np.asarray(out), ref["logits"], atol=1e-4, rtol=0)
