"""HF import and export on a mesh spanning 2 processes (``tessera.launch local``, 4 CPU devices
each): one job (``multihost_job.py``) imports a fixture sharded fsdp=4 x tensor=2 and exports it
back; its results are compared with one process's. Also in this process: a read sharded over
8 devices gives the one-device read for the families whose rules use every kind of transform."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from tessera.convert import export_hf, read_hf
from tessera.convert.configs import config_from_json
from tessera.convert.safetensors_io import INDEX_FILE, SafetensorsReader
from tessera.models.create import ModelSpec
from tessera.sharding import make_mesh, make_rules
from tessera.train.checkpoints import load_params
from tests.convert.helpers import F32, TESTS, fixture, hf_tensors, read
from tests.convert.test_roundtrip import assert_same_params
from tests.multiprocess import launch

NAME = "qwen2"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multihost"))
    launch.run([sys.executable, "-m", "tests.convert.multihost_job", NAME, out])
    results = []
    for i in range(2):
        with open(os.path.join(out, f"process-{i}.json")) as f:
            results.append(json.load(f))
    return out, results


def test_import_equals_one_process(job):
    out, _ = job
    work = os.path.join(out, "work")
    config = config_from_json(os.path.join(work, "config.json"))
    assert (config.mesh.fsdp, config.mesh.tensor) == (4, 2)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    target = ModelSpec(config.model).abstract(mesh, make_rules(config.mesh.rules))
    imported = load_params(work, target)[1]
    assert_same_params(imported, read(fixture(NAME), dtype="float32").params)


def test_each_process_read_about_half(job):
    """Every weight is split over fsdp (4 devices, 2 per process), so each process reads half of
    it; norm scales and biases are replicated and read whole by both."""
    _, results = job
    reader = SafetensorsReader(fixture(NAME))
    sizes = {n: reader.get(n).nbytes for n in reader.names}
    for r in results:
        read_bytes = r["bytes_read"]
        assert sorted(read_bytes) == sorted(sizes)
        for name, size in sizes.items():
            want = size if name.endswith(("norm.weight", "bias")) else size // 2
            assert read_bytes[name] == want, name
        assert sum(read_bytes.values()) < 0.55 * sum(sizes.values())


def test_export_equals_one_process(job, tmp_path):
    out, results = job
    mine = str(tmp_path / "one")
    _, files = export_hf(
        os.path.join(out, "work"), mine, max_shard_bytes=40_000, devices=jax.devices()[:1]
    )
    theirs = os.path.join(out, "exported")
    assert results[0]["files"] == results[1]["files"] == sorted(os.listdir(theirs))
    assert {f for f in files if "safetensors" not in f} == {
        f for f in os.listdir(theirs) if "safetensors" not in f
    } == {"config.json", "special_tokens_map.json"}
    for name in ("config.json", "special_tokens_map.json"):
        with open(os.path.join(mine, name)) as a, open(os.path.join(theirs, name)) as b:
            assert a.read() == b.read()
    one, two = hf_tensors(mine), hf_tensors(theirs)
    assert sorted(one) == sorted(two) == sorted(hf_tensors(fixture(NAME)))
    for key, value in one.items():
        assert two[key].dtype == value.dtype
        np.testing.assert_array_equal(two[key], value, err_msg=key)
    with open(os.path.join(mine, INDEX_FILE)) as a, open(os.path.join(theirs, INDEX_FILE)) as b:
        assert json.load(a)["metadata"] == json.load(b)["metadata"]


def test_each_process_wrote_its_own_files(job):
    out, results = job
    with open(os.path.join(out, "exported", INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    by_file = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    written = [dict(r["written"]) for r in results]
    assert all(written) and not set(written[0]) & set(written[1])
    assert {**written[0], **written[1]} == {f: sorted(n) for f, n in by_file.items()}
    reader = SafetensorsReader(fixture(NAME))
    nbytes = [sum(reader.get(t).nbytes for ts in w.values() for t in ts) for w in written]
    largest = max(reader.get(n).nbytes for n in reader.names)
    assert abs(nbytes[0] - nbytes[1]) <= largest


@pytest.mark.parametrize("path, rules", [
    (fixture("qwen2_moe"), ""),  # experts split over the expert axis
    (fixture("qwen2_moe"), "layers=expert"),  # the stacked layers split instead
    (fixture("mamba"), "layers=expert"),
    (fixture("rwkv7"), "layers=expert"),
    (fixture("vit"), "layers=expert"),
    (os.path.join(TESTS, "fixtures", "diffusers", "dit"), "layers=expert"),
], ids=["moe-experts", "moe-layers", "mamba", "rwkv7", "vit", "dit"])
def test_sharded_read_equals_one_device(path, rules):
    """Shards of stacked layers, experts, depthwise convolutions, flat biases, leading-ones
    tables, patch convolutions, tied copies and absent layers read through
    ``Transform.region`` as the whole tensors do."""
    overrides = {**F32, "mesh.fsdp": 2, "mesh.expert": 2, "mesh.tensor": 2, "mesh.rules": rules}
    sharded = read_hf(path, dtype="float32", overrides=overrides)
    assert_same_params(sharded.params, read(path).params)
