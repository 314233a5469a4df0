"""Config loading: YAML + key=value overrides, and one clear line (exit 2) for an unknown key or a wrong type."""

import pytest
from conftest import ROOT

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.vocab import VocabConfig


def test_yaml_then_overrides_last_wins(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("vocab_size: 1234\nlowercase: false\ncorpus:\n  inputs:\n    - path: a.txt\n      format: plain\n")
    cfg = load_config(VocabConfig, path, ["vocab_size=999", "corpus.encoding_errors=replace"])
    assert cfg.vocab_size == 999
    assert cfg.lowercase is False
    assert cfg.corpus.inputs[0].path == "a.txt" and cfg.corpus.inputs[0].format == "plain"
    assert cfg.corpus.encoding_errors == "replace"


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError) as exc:
        load_config(VocabConfig, None, ["vocab_sise=3"])
    assert exc.value.exit_code == 2
    assert "vocab_sise" in str(exc.value) and "\n" not in str(exc.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as exc:
        load_config(VocabConfig, None, ["min_frequency=often"])
    assert "min_frequency" in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("corpus:\n  encodnig_errors: replace\n")
    with pytest.raises(ConfigError, match="encodnig_errors"):
        load_config(VocabConfig, path)


def test_bad_value_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="encoding_errors"):
        load_config(VocabConfig, None, ["corpus.encoding_errors=ignore"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(VocabConfig, None, ["vocab_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(VocabConfig, tmp_path / "missing.yaml")


def test_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", "/data/here")
    path = tmp_path / "v.yaml"
    path.write_text("corpus:\n  inputs:\n    - path: ${oc.env:DATA_DIR,../shared/data}/x.txt\n")
    assert load_config(VocabConfig, path).corpus.inputs[0].path == "/data/here/x.txt"


def test_cli_reports_config_errors_in_one_line(cli):
    code, _, err = cli("vocab", "--config", ROOT / "recipes/vocab/demo.yaml", "vocab_size=abc")
    assert code == 2
    assert err.strip().count("\n") == 0 and "vocab_size" in err
