import pytest
from absl import flags
from ml_collections import config_flags

from tessera.cli import config_args, run_main
from tessera.configs import config_names, load_config, resolve_config_path
from tessera.models.create import ModelSpec


def test_packaged_names_and_paths():
    assert "llama" in config_names()
    path = resolve_config_path("llama:tiny")
    assert path.endswith("llama.py:tiny")
    assert load_config(path).model.num_layers == load_config("llama:tiny").model.num_layers


def test_presets_and_overrides():
    cfg = load_config("llama:8b")
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.num_kv_heads) == (4096, 32, 8)
    assert cfg.model.rope_scaling.type == "llama3"
    cfg = load_config("llama:tiny,train.steps=7,model.dtype=float32")
    assert cfg.train.steps == 7 and cfg.model.dtype == "float32"
    cfg = load_config("llama:tiny", {"optim.learning_rate": "1e-4"})
    assert cfg.optim.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("preset, params", [
    ("tiny", 0.147914e6), ("ti16", 5.72e6), ("s16", 22.05e6), ("b16", 86.57e6), ("b32", 88.22e6),
    ("l16", 304.33e6), ("h14", 632.05e6),
])
def test_vit_presets_build_with_published_sizes(preset, params):
    """Abstract shapes only; the counts are HF ViTForImageClassification's at 1000 classes."""
    cfg = load_config(f"vit:{preset}")
    assert (cfg.model.name, cfg.train.task, cfg.model.causal, cfg.model.rope) == (
        "vit", "classify", False, False)
    assert ModelSpec(cfg.model).num_params() == pytest.approx(params, rel=1e-3)


@pytest.mark.parametrize("spec, params, shape", [
    # (experts, top-k, expert width, d_model, layers, kv heads)
    ("mixtral:8x7b", 46.7e9, (8, 2, 14336, 4096, 32, 8)),
    ("qwen_moe:30b_a3b", 30.5e9, (128, 8, 768, 2048, 48, 4)),
])
def test_moe_presets_build_with_published_sizes(spec, params, shape):
    """Abstract shapes only: Mixtral-8x7B's and Qwen3-30B-A3B's published totals."""
    cfg = load_config(spec)
    m = cfg.model
    assert m.pattern == ("attention:moe",) and cfg.mesh.expert > 1
    assert (m.moe.num_experts, m.moe.num_experts_per_tok, m.moe.expert_dim, m.d_model,
            m.num_layers, m.num_kv_heads) == shape
    assert m.moe.score_func == "softmax" and m.moe.norm_topk_prob and m.rope_theta == 1e6
    assert m.moe.num_experts % cfg.mesh.expert == 0
    assert ModelSpec(m).num_params() == pytest.approx(params, rel=0.01)


@pytest.mark.parametrize("spec, params, dense, experts", [
    ("deepseek:v2_lite", 15.71e9, 1, (64, 6, 1408, 2, "softmax")),
    ("deepseek:v3", 671.0e9, 3, (256, 8, 2048, 1, "sigmoid")),
])
def test_deepseek_presets_build_with_published_sizes(spec, params, dense, experts):
    """Abstract shapes only: DeepSeek-V2-Lite's 15.7B and V3's 671B (without its multi-token
    prediction module), dense layers first, then MLA + MoE."""
    cfg = load_config(spec)
    m = cfg.model
    assert m.prefix == ("mla:mlp",) * dense and m.pattern == ("mla:moe",)
    assert (m.moe.num_experts, m.moe.num_experts_per_tok, m.moe.expert_dim,
            m.moe.num_shared_experts, m.moe.score_func) == experts
    assert m.mla.rope_interleave and m.moe.num_experts % cfg.mesh.expert == 0
    assert ModelSpec(m).num_params() == pytest.approx(params, rel=1e-3)


def test_locked_config_rejects_typos():
    with pytest.raises(KeyError, match="unknown config key 'model.num_layer'"):
        load_config("llama:tiny", {"model.num_layer": 3})
    cfg = load_config("llama:tiny")
    with pytest.raises(AttributeError):
        cfg.model.num_layer = 3


def test_unknown_preset_and_config():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config("llama:huge")
    with pytest.raises(ValueError, match="unknown config 'lama'"):
        load_config("lama:tiny")
    with pytest.raises(FileNotFoundError):
        load_config("nope/missing.py:tiny")


def test_typed_overrides_and_both_forms_agree():
    given = {"model.d_model": "64", "optim.learning_rate": "1", "train.progress": "False",
             "model.dtype": "float32", "model.pattern": "attention:mlp sliding_window=8",
             "model.prefix": "('attention:mlp', 'attention:none')"}
    cfg = load_config("llama:tiny", given)
    assert (cfg.model.d_model, cfg.optim.learning_rate, cfg.train.progress) == (64, 1.0, False)
    assert isinstance(cfg.optim.learning_rate, float) and cfg.model.dtype == "float32"
    assert cfg.model.pattern == ("attention:mlp sliding_window=8",)
    assert cfg.model.prefix == ("attention:mlp", "attention:none")
    preset = load_config("llama:tiny," + ",".join(f"{k}={v}" for k, v in given.items()))
    assert preset.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("key, value, message", [
    ("model.d_model", "abc", r"^model\.d_model: 'abc' is not an int$"),
    ("model.d_model", "64.5", r"^model\.d_model: '64\.5' is not an int$"),
    ("optim.learning_rate", "fast", r"^optim\.learning_rate: 'fast' is not a float$"),
    ("train.progress", "maybe", r"^train\.progress: 'maybe' is not a bool$"),
    ("model.d_model", 64.0, r"^model\.d_model: '?64\.0'? is not an int$"),  # text: quoted
    ("model", "1", r"^model is a section, not a value"),
])
def test_wrongly_typed_override_is_a_value_error(key, value, message):
    for load in (lambda: load_config("llama:tiny", {key: value}),
                 lambda: load_config(f"llama:tiny,{key}={value}")):
        with pytest.raises(ValueError, match=message):
            load()


def test_unknown_keys_in_both_forms():
    for spec, overrides in (("llama:tiny,train.step=5", None), ("llama:tiny", {"train.step": 5})):
        with pytest.raises(KeyError, match="unknown config key 'train.step': train has no 'step'"):
            load_config(spec, overrides)
    with pytest.raises(KeyError, match="model.d_model is a value, not a section"):
        load_config("llama:tiny", {"model.d_model.x": 1})
    with pytest.raises(ValueError, match="more than one preset"):
        load_config("llama:tiny,small")


def test_bad_config_files_are_value_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=None)\n    return None\n")
    with pytest.raises(ValueError, match=f"config file {bad}, line 1: expected ':'"):
        load_config(str(bad))
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        load_config(str(bad))


def test_absl_parses_the_overrides_to_our_values():
    """absl's config_flags parses what ``config_args`` hands it to the config we loaded."""
    argv = ["prog", "--config.model.d_model", "64", "--config=llama:tiny,optim.b1=0.8",
            "--config.optim.learning_rate=1", "--noconfig.train.progress", "--config.train.z_loss",
            "1e-4", "--config.model.pattern=attention:mlp sliding_window=8", "--other=1",
            "--config.model.prefix=('attention:mlp',)", "--config.train.steps=3",
            "--config.train.steps=5", "--config.mesh.strict"]
    ours = load_config("llama:tiny,optim.b1=0.8", {
        "model.d_model": 64, "optim.learning_rate": 1.0, "train.progress": False,
        "train.z_loss": 1e-4, "model.pattern": ("attention:mlp sliding_window=8",),
        "model.prefix": ("attention:mlp",), "train.steps": 5, "mesh.strict": True})
    args = config_args(argv)
    assert args[1].startswith("--config=/") and "--other=1" in args
    values = flags.FlagValues()
    flags.DEFINE_string("other", None, "", flag_values=values)
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=args)
    values(args)
    assert values.config.to_dict() == ours.to_dict()


@pytest.mark.parametrize("args, message", [
    (["--config=CONFIGS/bad.py"], "config file CONFIGS/bad.py, line 1: expected ':'"),
    (["--config=llama:huge"], "unknown preset 'huge'; known: tiny, small"),
    (["--config=llama:tiny", "--config.model.d_model=abc"], "model.d_model: 'abc' is not an int"),
    (["--config=llama:tiny,model.d_model=abc"], "model.d_model: 'abc' is not an int"),
    (["--config=llama:tiny,train.step=5"], "unknown config key 'train.step'"),
    (["--config=llama:tiny", "--config.train.step=5"], "unknown config key 'train.step'"),
    (["--config=llama:tiny", "--config.model.d_model"], "--config.model.d_model needs a value"),
])
def test_run_main_config_mistakes_are_one_line(tmp_path, capsys, args, message):
    """Both CLIs check their config in ``run_main`` before absl parses a flag; the CLI test
    (tests/train/test_cli.py) runs some of these through a real process."""
    (tmp_path / "bad.py").write_text("def get_config(arg=None)\n")
    args = [a.replace("CONFIGS", str(tmp_path)) for a in args]
    message = message.replace("CONFIGS", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda argv: pytest.fail("main ran"), ["prog", *args])
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("tessera: error: ") and message in line, line
