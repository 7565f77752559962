"""Every command follows the module contract; start-up stays free of torch/transformers; serve's options reach
ServerSettings from flags, environment and YAML."""

import json
import subprocess
import sys

import pytest
from pydantic import BaseModel

from nlm.cli import COMMANDS, load_command, main
from nlm.inference.settings import ServerSettings

HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_module_has_help_options_and_run(name):
    module = load_command(name)
    assert module.__doc__ and module.__doc__.strip().splitlines()[0]
    assert issubclass(module.Options, BaseModel) and callable(module.run)
    assert main([*name.split(), "--help"]) == 0


def _imports_after(args):
    probe = ("import sys, json, contextlib, io\nfrom nlm.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n    code = main(sys.argv[1:])\n"
             f"print(json.dumps([code, sorted(m for m in {HEAVY!r} if m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["config", "show"], 0),
    (["train", "--help"], 0),
    (["serve", "--help"], 0),
    (["eval", "--model", "m", "--data", "d", "--batch_size", "0"], 2),
    (["train", "--lora.r", "0"], 2),
    (["trian"], 2),
    (["generate", "--prompt", "p"], 2),
])
def test_help_config_show_and_usage_errors_do_not_import_torch_or_transformers(args, code):
    assert _imports_after(args) == [code, []]


def test_lr_scheduler_names_match_transformers():
    from transformers.trainer_utils import SchedulerType

    from nlm.config.settings import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_serve_options_are_server_settings_under_the_same_flags(monkeypatch, tmp_path, model_dirs):
    seen = {}
    monkeypatch.setattr("nlm.inference.server.serve", lambda settings: seen.setdefault("settings", settings))
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {model_dirs['student']}\nmax_batch_size: 3\nport: 7000\n")
    monkeypatch.setenv("NLM_SERVE__PORT", "9001")
    monkeypatch.setenv("NLM_KEY_FOR_TEST", "k3y-value-1234")
    assert main(["serve", "--config", str(config), "--request_timeout", "5", "--graceful_shutdown", "2",
                 "--api_key_env", "NLM_KEY_FOR_TEST", "--trust_remote_code"]) == 0
    settings = seen["settings"]
    assert isinstance(settings, ServerSettings)
    assert (settings.model, settings.max_batch_size, settings.port) == (model_dirs["student"], 3, 9001)
    assert (settings.request_timeout_s, settings.graceful_shutdown_s, settings.api_key) == (5.0, 2.0, "k3y-value-1234")
    assert settings.trust_remote_code is True and settings.max_new_tokens_cap == ServerSettings().max_new_tokens_cap


def test_serve_refuses_unknown_yaml_keys_and_a_secret_in_argv(tmp_path, capsys):
    config = tmp_path / "serve.yaml"
    config.write_text("max_batch: 3\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "unknown key 'max_batch' for 'nlm serve' (did you mean 'max_batch_size'?)" in capsys.readouterr().err
    assert main(["serve", "--api_key", "x"]) == 2
