"""No preset keeps a large parameter whole on every device: with FSDP over 128 devices (and
each preset's own expert axis), no parameter of a million values or more is whole on every
device, and every big preset's parameters per device are within 10% of an even split (biases
and norm scales stay whole by design: ViT-H/14's are 0.45M of its 4.9M per device). Shapes and
rules only, no arrays and no compile. Before this check, MLA's
decompressions (3.3B of DeepSeek-V3's parameters), Mamba's x_proj / dt_proj / A_log and
RWKV's LoRA up-projections were whole on every device: 6.6x the even share for mamba:2.8b."""

import math

import jax
import pytest
from jax.sharding import AbstractMesh

from tessera.configs import load_config
from tessera.models.create import ModelSpec
from tessera.sharding import make_rules

DEVICES = 128
PRESETS = ["llama:8b", "llama:70b", "mamba2:2.7b", "mamba:2.8b", "mixtral:8x7b",
           "qwen_moe:30b_a3b", "deepseek:v3", "rwkv6:7b", "rwkv7:7b", "retnet:6.7b", "vit:h14"]
AXES = ("data", "fsdp", "expert", "sequence", "tensor")


def per_device(spec: ModelSpec, rules: dict, sizes: dict) -> tuple[int, int, list]:
    """(parameters per device, total, the largest unsplit ones) under the shardings the
    model is created with (`ModelSpec.shardings`), on an abstract mesh of ``sizes``."""
    mesh = AbstractMesh(tuple(sizes[a] for a in AXES), AXES)
    flat = jax.tree_util.tree_flatten_with_path(spec.shapes)[0]
    local, total, whole = 0, 0, []
    for (path, shape), sharding in zip(flat, jax.tree.leaves(spec.shardings(mesh, rules))):
        local += math.prod(sharding.shard_shape(shape.shape))
        total += shape.size
        if sharding.shard_shape(shape.shape) == shape.shape and shape.size >= 2**20:
            whole.append((jax.tree_util.keystr(path), sharding.spec, shape.shape))
    return local, total, whole


@pytest.mark.parametrize("preset", PRESETS)
def test_parameters_split_evenly_over_the_pod(preset):
    cfg = load_config(preset)
    spec = ModelSpec(cfg.model)
    expert = max(int(cfg.mesh.expert), 1)
    sizes = {"data": 1, "fsdp": DEVICES // expert, "expert": expert, "sequence": 1, "tensor": 1}
    local, total, whole = per_device(spec, make_rules(cfg.mesh.rules), sizes)
    assert not whole, whole
    assert local <= 1.10 * total / DEVICES, (local, total / DEVICES)
