"""Presets, validation errors, parameter accounting and model.info."""
import pytest

from model.config import ConfigError, ModelConfig
from model.accounting import count_params, kv_bytes_per_token
from model.info import main as info_main
from model.transformer import build_on_meta


@pytest.mark.parametrize("preset,total,active", [("flash", 284e9, 13e9), ("pro", 1.6e12, 49e9)])
def test_v4_parameter_counts(preset, total, active):
    c = count_params(build_on_meta(ModelConfig.from_preset(preset)))
    assert abs(c.total / total - 1) < 0.03, c
    assert abs(c.active / active - 1) < 0.03, c


def test_small_preset_budget():
    c = count_params(build_on_meta(ModelConfig.from_preset("small")))
    assert 0.8e9 <= c.total <= 1.3e9, c
    assert 150e6 <= c.active <= 250e6, c


def test_tiny_is_a_few_million_besides_embedding():
    c = count_params(build_on_meta(ModelConfig.from_preset("tiny")))
    assert 0.5e6 <= c.total - c.embedding <= 8e6, c


@pytest.mark.parametrize("field,value,match", [
    ("compress_ratios", [0, 1, 4, 16, 0], "compress_ratios"),
    ("index_topk", 0, "index_topk"),
    ("o_groups", 3, "o_groups"),
    ("rope_dim", 64, "rope_dim"),
    ("hyper_connections", "mhx", "hyper_connections"),
])
def test_invalid_config_names_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_preset("tiny", **{field: value})


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_preset("tiny", n_layer=3)


def test_kv_cache_smaller_than_dense():
    cfg = ModelConfig.from_preset("flash")
    ours, base = kv_bytes_per_token(cfg, 1 << 20)
    assert ours < 0.1 * base


def test_info_cli_prints(capsys):
    info_main(["tiny"])
    out = capsys.readouterr().out
    assert "schedule" in out and "active/token" in out and "KV cache" in out


def test_presets_load_without_pyyaml():
    """GPU images without PyYAML read the flat presets with model.config.load_flat_yaml: same dicts."""
    import yaml

    from model.config import PRESET_DIR, load_flat_yaml

    for path in sorted(PRESET_DIR.glob("*.yaml")):
        with open(path) as fh:
            want = yaml.safe_load(fh)
        with open(path) as fh:
            assert load_flat_yaml(fh) == want, path.name
