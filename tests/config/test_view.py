"""Grouped presentation of the training options: every option once, and `config show` output loads back."""

from nlm.config.sources import known_keys, load_config
from nlm.config.view import format_config, grouped_keys, options_help


def test_every_option_is_in_exactly_one_group():
    seen = [key for keys in grouped_keys().values() for key in keys]
    assert sorted(seen) == sorted(known_keys()) and len(seen) == len(set(seen))
    assert {"models", "data", "optimisation", "devices and precision", "lora", "distillation"} <= set(grouped_keys())


def test_config_show_output_is_a_config_that_loads_back_to_the_same_values(tmp_path):
    loaded = load_config(["--learning_rate", "0.003", "--lora.r", "4", "--teacher_model", "t", "--report_to", "none"])
    text = format_config(loaded, sources=True)
    assert text.startswith("# models\nteacher_model: t") and "\n# optimisation\n" in text
    shown = tmp_path / "shown.yaml"
    shown.write_text(text)
    assert load_config([], shown).config == loaded.config


def test_help_lists_groups_and_every_flag():
    text = options_help()
    assert " models:" in text and " lora:" in text
    assert all(f"--{key} " in text for key in known_keys())
