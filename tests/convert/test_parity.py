"""Import each golden HF model: logits and greedy continuation equal the transformers reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from tessera.convert import load_hf, save_hf
from tessera.sharding import use_mesh
from tests.cached_decode import check_cached_decode
from tests.convert.helpers import (
    F32,
    LM_NAMES,
    fixture,
    forward,
    greedy,
    hf_tensors,
    read,
    reference,
)


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


# fla's recurrent families (tools/make_fla_golden.py): float32 logits within 1e-5 of fla's, and
# the cache fed the reference tokens in pieces reproduces them.
FLA_NAMES = ("retnet", "rwkv6", "rwkv7")
FLA_TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=FLA_NAMES)
def fla_model(request):
    return request.param, read(fixture(request.param))


def test_fla_logits_within_1e5_and_cached_decode(fla_model):
    name, model = fla_model
    ref = reference(name)
    np.testing.assert_allclose(forward(model)(ref["tokens"]), ref["logits"], **FLA_TOL)

    @jax.jit
    def apply(params, tokens, cache):
        with use_mesh(model.mesh, model.rules):
            return model.spec.merge(params)(tokens, cache=cache)

    batch, length = ref["tokens"].shape
    cache = model.spec.merge(model.params).init_cache(batch, length, jnp.float32)
    check_cached_decode(apply, model.params, ref["tokens"], ref["logits"], cache, [7, 1, 5],
                        FLA_TOL)


def test_rwkv7_first_layer_value_lora_is_zero_and_not_exported(tmp_path):
    """fla's first RWKV-7 layer has no v_lora: the prefix block's unused one imports as zeros
    and export writes none (the other layers' are read)."""
    model = read(fixture("rwkv7"))
    first, rest = model.params["prefix"][0]["mixer"], model.params["units"]["blocks"][0]["mixer"]
    for part in ("down", "up", "bias"):
        assert not np.any(np.asarray(first[f"v_lora_{part}"]))
        assert np.all(np.any(np.asarray(rest[f"v_lora_{part}"]).reshape(2, -1), axis=1))
    save_hf(model.params, model.config, str(tmp_path))
    names = hf_tensors(str(tmp_path))
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in names
    assert "model.layers.1.attn.v_lora.lora.0.weight" in names
