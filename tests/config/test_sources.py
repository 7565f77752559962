import pytest

from nlm.cli import main
from nlm.config.sources import load_config
from nlm.errors import ConfigError


def _yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_match_documented_values():
    config = load_config([]).config
    assert config.distillation.alpha == 0.5
    assert config.distillation.temperature == 2.0
    assert config.distillation.divergence == "forward_kl"
    assert config.device_preference == ["cuda", "mps", "cpu"]
    assert config.trust_remote_code is False
    assert config.lora.target_modules == "auto"
    assert config.hf_token is None


@pytest.mark.parametrize(
    "cli, env, yaml_text, expected, source",
    [
        (["--learning_rate", "0.003"], {"NLM_LEARNING_RATE": "0.002"}, None, 0.003, "cli"),
        (["--learning_rate", "0.003"], {}, "learning_rate: 0.001\n", 0.003, "cli"),
        ([], {"NLM_LEARNING_RATE": "0.002"}, "learning_rate: 0.001\n", 0.002, "env"),
        ([], {}, "learning_rate: 0.001\n", 0.001, "yaml"),
        ([], {}, None, 5e-5, "default"),
    ],
)
def test_each_precedence_pair(tmp_path, monkeypatch, cli, env, yaml_text, expected, source):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config_file = _yaml(tmp_path, yaml_text) if yaml_text else None
    loaded = load_config(cli, config_file)
    assert loaded.config.learning_rate == pytest.approx(expected)
    assert loaded.sources["learning_rate"] == source


def test_nested_values_merge_across_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("NLM_LORA__R", "7")
    config_file = _yaml(tmp_path, "lora:\n  r: 3\n  alpha: 4\n  enabled: true\n")
    loaded = load_config(["--lora.dropout", "0.2"], config_file)
    lora = loaded.config.lora
    assert (lora.r, lora.alpha, lora.enabled, lora.dropout) == (7, 4.0, True, 0.2)
    assert loaded.sources["lora.r"] == "env"
    assert loaded.sources["lora.alpha"] == "yaml"
    assert loaded.sources["lora.dropout"] == "cli"
    assert loaded.sources["lora.include_lm_head"] == "default"


def test_nested_cli_beats_nested_env(monkeypatch):
    monkeypatch.setenv("NLM_LORA__R", "7")
    assert load_config(["--lora.r", "32"]).config.lora.r == 32


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["--lora.r", "0"], {}, "lora.r = '0' (from command line --lora.r): Input should be greater than or equal to 1"),
        ([], {"NLM_DISTILLATION__ALPHA": "1.5"}, "distillation.alpha = '1.5' (from environment NLM_DISTILLATION__ALPHA)"),
        (["--distillation.temperature", "0"], {}, "distillation.temperature = '0'"),
        (["--learning_rate", "-1"], {}, "learning_rate = '-1'"),
        (["--distillation.divergence", "kl"], {}, "'forward_kl', 'reverse_kl', 'jsd', 'tvd' or 'skew_kl'"),
        (["--device_preference", "gpu"], {}, "device_preference = 'gpu'"),
        (["--run_name", "../escape"], {}, "must be a single folder name"),
        (["--max_steps", "many"], {}, "max_steps = 'many'"),
    ],
)
def test_validation_errors_name_field_value_source_and_range(monkeypatch, args, env, needle):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_config(args)
    assert needle in str(info.value)
    assert info.value.exit_code == 2


def test_yaml_error_names_the_file(tmp_path):
    config_file = _yaml(tmp_path, "distillation:\n  alpha: 3\n")
    with pytest.raises(ConfigError, match=rf"distillation.alpha = 3 \(from {config_file}\)"):
        load_config([], config_file)


def test_unknown_flag_suggests_the_close_name():
    with pytest.raises(ConfigError, match=r"unknown option --learnng_rate \(did you mean 'learning_rate'\?\)"):
        load_config(["--learnng_rate", "1e-3"])


def test_unknown_yaml_key_suggests_the_close_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rank'"):
        load_config([], _yaml(tmp_path, "lora:\n  rank: 3\n"))
    with pytest.raises(ConfigError, match=r"did you mean 'num_train_epochs'"):
        load_config([], _yaml(tmp_path, "num_train_epoch: 3\n"))


def test_yaml_that_is_not_a_mapping_or_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config([], _yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([], _yaml(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config([], tmp_path / "missing.yaml")


def test_secrets_are_refused_in_files(tmp_path):
    with pytest.raises(ConfigError, match="hf_token' is a secret and must not be stored in a file; set NLM_HF_TOKEN"):
        load_config([], _yaml(tmp_path, "hf_token: hf_abc\n"))


def test_secret_from_environment_and_cli(monkeypatch):
    monkeypatch.setenv("NLM_HF_TOKEN", "hf_from_env_123")
    assert load_config([]).config.hf_token.get_secret_value() == "hf_from_env_123"
    assert load_config(["--hf_token", "hf_from_cli_456"]).config.hf_token.get_secret_value() == "hf_from_cli_456"


@pytest.mark.parametrize(
    "args, expected",
    [(["--overwrite"], True), (["--overwrite", "true"], True), (["--overwrite=false"], False), (["--no-overwrite"], False),
     (["--lora.enabled"], True), (["--lora.enabled", "false"], False)],
)
def test_boolean_flag_forms(args, expected):
    config = load_config(args).config
    value = config.overwrite if "overwrite" in args[0] else config.lora.enabled
    assert value is expected


def test_lists_accept_commas():
    config = load_config(["--device_preference", "mps,cpu", "--lora.target_modules", "q_proj,v_proj", "--report_to", "none"]).config
    assert config.device_preference == ["mps", "cpu"]
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.report_to == []


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="resume and overwrite"):
        load_config(["--resume", "--overwrite"])
    with pytest.raises(ConfigError, match="load_best_model_at_end needs eval_strategy"):
        load_config(["--load_best_model_at_end"])


def test_config_show_prints_yaml_with_sources(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NLM_SEED", "7")
    config_file = _yaml(tmp_path, "learning_rate: 0.001\n")
    assert main(["config", "show", "--config", str(config_file), "--sources", "--lora.r", "8"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 0.001" in out and "seed: 7" in out and "  r: 8" in out
    assert "# learning_rate" in out and "yaml" in out
    lines = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("# ") and len(line.split()) == 3}
    assert lines["seed"] == "env" and lines["lora.r"] == "cli" and lines["learning_rate"] == "yaml" and lines["run_name"] == "default"


def test_cli_exits_2_with_one_line_on_config_errors(capsys):
    assert main(["config", "show", "--lora.r", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nlm: error: lora.r = '0'")
    assert "Traceback" not in "\n".join(err)


def test_cli_debug_shows_the_traceback():
    with pytest.raises(ConfigError):
        main(["--debug", "config", "show", "--lora.r", "0"])


def test_configuration_reference_is_in_sync():
    from pathlib import Path

    from nlm.commands.reference import render_reference

    committed = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"
    assert committed.read_text() == render_reference(), "run: python -m nlm.commands.reference > docs/CONFIGURATION.md"


@pytest.mark.parametrize("text", ["{0: 1, 1: 3}", "{'0': 1, '1': 3}"])
def test_a_dict_valued_option_is_one_value_in_yaml_env_and_cli(tmp_path, monkeypatch, text):
    path = tmp_path / "h.yaml"
    path.write_text(f"distillation:\n  hidden_states:\n    layers: {text}\n")
    assert load_config([], path).config.distillation.hidden_states.layers == {0: 1, 1: 3}
    assert load_config(["--distillation.hidden_states.layers", text]).config.distillation.hidden_states.layers == {0: 1, 1: 3}
    monkeypatch.setenv("NLM_DISTILLATION__HIDDEN_STATES__LAYERS", text)
    assert load_config([]).config.distillation.hidden_states.layers == {0: 1, 1: 3}


def test_unknown_keys_are_still_caught_next_to_a_dict_valued_option(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("distillation:\n  hidden_states:\n    layers: {0: 1}\n    layer: 2\n")
    with pytest.raises(ConfigError, match="unknown key 'distillation.hidden_states.layer'"):
        load_config([], path)
