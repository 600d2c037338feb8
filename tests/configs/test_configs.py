import pytest

from tessera.configs import config_names, load_config, resolve_config_path


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
