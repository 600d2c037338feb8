"""An imported workdir is a tessera workdir: config.py loads, train resumes from the imported
step 0, the decode engine reproduces the reference greedy continuation, and the CLI round-trips."""

import json
import os

import jax
import numpy as np
import pytest

from tessera.configs import load_config
from tessera.convert import import_hf
from tessera.models.create import ModelSpec
from tessera.serve.loading import load_decoder
from tessera.serve.sampling import SamplingParams
from tessera.sharding import make_mesh, make_rules
from tessera.train.checkpoints import Checkpointer
from tessera.train.trainer import train
from tests.convert.helpers import (
    copy_fixture,
    fixture,
    hf_tensors,
    read,
    reference,
    run_cli,
)

ONE = jax.devices()[:1]


def restore(work: str, step: int, config):
    mesh = make_mesh(config.mesh, ONE)
    spec = ModelSpec(config.model)
    ckpt = Checkpointer(work, read_only=True)
    try:
        return ckpt.restore_params(step, spec.abstract(mesh, make_rules(config.mesh.rules)))[1]
    finally:
        ckpt.close()


@pytest.mark.slow
def test_import_writes_a_workdir_that_trains_and_decodes(tmp_path):
    src = copy_fixture("mistral", str(tmp_path / "hf"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_text("{}")
    work = str(tmp_path / "work")
    config = import_hf(src, work, devices=ONE)
    assert sorted(os.listdir(work)) == [
        "checkpoints", "config.json", "config.py", "hf_config.json", "imported_config.json",
        "tokenizer",
    ]
    assert sorted(os.listdir(os.path.join(work, "tokenizer"))) == [
        "tokenizer.json", "tokenizer_config.json",
    ]
    loaded = load_config(os.path.join(work, "config.py"))
    assert loaded == config and loaded.model.sliding_window == 8
    assert (loaded.model.param_dtype, loaded.model.dtype) == ("float32", "float32")
    assert load_config(os.path.join(work, "config.py") + ":model.dtype=bfloat16").model.dtype == (
        "bfloat16"
    )

    # The decode engine (KV cache, here a sliding-window ring) continues like transformers, in
    # the import's own compute dtype (the checkpoint's float32), with no override.
    ref = reference("mistral")
    decoder, step = load_decoder(loaded, work, devices=ONE)
    (completion,) = decoder.generate(
        [ref["prompt"].tolist()], SamplingParams(), len(ref["greedy"]), stop_tokens=()
    )
    assert step == 0 and completion.tokens == ref["greedy"].tolist()

    # Train resumes from the imported step 0 (learning rate 0: the weights stay the imported).
    run = load_config(
        os.path.join(work, "config.py"),
        {"train.steps": 1, "optim.learning_rate": 0.0, "optim.warmup_steps": 0,
         "data.seq_len": 32, "data.global_batch_size": 2, "checkpoint.async_save": False,
         "train.progress": False, "train.tensorboard": False},
    )
    result = train(run, work, devices=ONE)
    assert result.resumed_from == 0 and result.step == 1
    assert np.isfinite(result.losses[1])
    imported = read(fixture("mistral")).params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restore(work, 1, run), imported)


def test_cli_import_export(tmp_path):
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    proc = run_cli("import", f"--hf_dir={fixture('llama3')}", f"--workdir={work}")
    assert proc.returncode == 0, proc.stderr
    assert "imported llama" in proc.stdout
    # The float32 checkpoint computes in float32 by default, and the log says how to change it.
    assert ("dtype: model.param_dtype=float32 (the checkpoint's config.json dtype), "
            "model.dtype=float32 (compute, the parameter dtype); --compute_dtype=bfloat16 "
            "(or --set=model.dtype=bfloat16) computes in bfloat16") in proc.stdout
    stored = json.load(open(os.path.join(work, "config.json")))
    assert (stored["model"]["param_dtype"], stored["model"]["dtype"]) == ("float32", "float32")
    assert stored["model"]["rope_scaling"]["type"] == "llama3"
    proc = run_cli("export", f"--workdir={work}", f"--hf_dir={out}", "--max_shard_size=60KB")
    assert proc.returncode == 0, proc.stderr
    original, exported = hf_tensors(fixture("llama3")), hf_tensors(out)
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["bos_token_id"] == 1  # kept from the imported config.json
