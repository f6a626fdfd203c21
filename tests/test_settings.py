"""Layered settings: flag > environment > --config > user config > configs/default.yaml, validated everywhere."""

from __future__ import annotations

import pytest
import yaml

from llavanext_cli.errors import SetupError, UsageError
from llavanext_cli.io.settings import SETTING_NAMES, load_settings

from conftest import REPO, run_cli


def test_defaults_come_from_the_shipped_file():
    defaults = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    settings = load_settings({}, env={})
    assert set(defaults) == set(SETTING_NAMES)
    assert settings.model == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert settings.as_dict() == defaults


def test_precedence_flag_env_config_user_default(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("model: from-user\nmax_new_tokens: 11\ndtype: float16\nseed: 1\n")
    config = tmp_path / "run.yaml"
    config.write_text("model: from-config\nmax_new_tokens: 22\ndtype: bfloat16\n")
    env = {"LLAVA_MODEL": "from-env", "LLAVA_MAX_NEW_TOKENS": "33"}
    settings = load_settings({"model": "from-flag"}, config, env=env, user_config=home / "config.yaml")
    assert settings.model == "from-flag"            # flag beats everything
    assert settings.max_new_tokens == 33            # env beats --config
    assert settings.dtype == "bfloat16"             # --config beats the user file
    assert settings.seed == 1                       # the user file beats the default
    assert settings.quant == "none"                 # the default
    assert settings.sources["model"] == "--model" and settings.sources["max_new_tokens"] == "LLAVA_MAX_NEW_TOKENS"


def test_user_config_location(tmp_path, monkeypatch):
    from llavanext_cli.io.settings import user_config_path

    monkeypatch.setenv("LLAVA_HOME", str(tmp_path))
    assert user_config_path() == tmp_path / "config.yaml"
    monkeypatch.delenv("LLAVA_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert user_config_path() == tmp_path / "xdg" / "llava" / "config.yaml"  # typer's app dir on Linux


@pytest.mark.parametrize("content,key", [
    ("modle: x\n", "modle"),
    ("max_new_tokens: many\n", "max_new_tokens"),
    ("dtype: float64\n", "dtype"),
    ("offline: 3\n", "offline"),
    ("temperature: -1\n", "temperature"),
])
def test_bad_config_file_exits_2_naming_file_and_key(tmp_path, content, key):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = run_cli("inspect-config", "llava-hf/llava-1.5-7b-hf", "--config", config)
    assert result.exit_code == 2
    assert str(config) in result.stderr and f"'{key}'" in result.stderr
    assert result.stderr.startswith("Error:") and "Traceback" not in result.stderr


def test_bad_user_config_is_named_too(isolated_environment):
    (isolated_environment / "config.yaml").write_text("batch_size: 0\n")
    result = run_cli("inspect-config", "llava-hf/llava-1.5-7b-hf")
    assert result.exit_code == 2 and "config.yaml" in result.stderr and "'batch_size'" in result.stderr


def test_bad_environment_value(monkeypatch):
    with pytest.raises(UsageError, match="LLAVA_BATCH_SIZE"):
        load_settings({}, env={"LLAVA_BATCH_SIZE": "lots"})
    with pytest.raises(UsageError, match="LLAVA_DEVICE"):
        load_settings({}, env={"LLAVA_DEVICE": "gpu"})


def test_missing_config_file_is_a_setup_error(tmp_path):
    with pytest.raises(SetupError):
        load_settings({}, tmp_path / "missing.yaml", env={})
    result = run_cli("inspect-config", "llava-hf/llava-1.5-7b-hf", "--config", tmp_path / "missing.yaml")
    assert result.exit_code == 3


def test_env_model_is_used_by_commands(monkeypatch, tiny_llava):
    monkeypatch.setenv("LLAVA_MODEL", str(tiny_llava))
    result = run_cli("inspect-config", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert str(tiny_llava) in result.stdout


def test_bad_flag_value_exits_2():
    result = run_cli("caption", "x.png", "--dtype", "float64")
    assert result.exit_code == 2 and "--dtype" in result.stderr and "float64" in result.stderr
