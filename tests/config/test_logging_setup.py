import json
import logging

from nlm.cli import main
from nlm.config.logging_setup import setup_logging
from nlm.config.sources import environment_secrets, load_config
from nlm.training.metadata import redacted_config, write_metadata

SECRET = "hf_TopSecretValue_42"


def test_secret_from_environment_never_reaches_logs_output_or_metadata(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("NLM_HF_TOKEN", SECRET)
    # Through the CLI: its logging set-up registers environment secrets.
    assert main(["--log_level", "DEBUG", "config", "show", "--sources"]) == 0
    logging.getLogger("nlm.test").info("token is %s", SECRET)
    logging.getLogger("transformers.some_module").warning("header Authorization: Bearer %s", SECRET)
    try:
        raise RuntimeError(f"request failed with {SECRET}")
    except RuntimeError:
        logging.getLogger("nlm.test").exception("boom")
    captured = capsys.readouterr()
    assert SECRET not in captured.out and SECRET not in captured.err
    assert "hf_token: '**********'" in captured.out
    assert "**********" in captured.err  # the log lines were redacted, not dropped

    config = load_config([]).config
    metadata = write_metadata(tmp_path / "meta.json", config=redacted_config(config))
    text = metadata.read_text()
    assert SECRET not in text and json.loads(text)["config"]["hf_token"] == "**********"


def test_json_log_format_is_one_object_per_line(capsys):
    setup_logging("INFO", "json", secrets=[SECRET])
    logging.getLogger("nlm.test").info("step done", extra={"step": 3, "loss": 1.5})
    logging.getLogger("nlm.test").info("secret %s", SECRET)
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert lines[0]["message"] == "step done" and lines[0]["step"] == 3 and lines[0]["level"] == "INFO"
    assert SECRET not in json.dumps(lines)


def test_environment_secrets_lists_only_set_values():
    assert environment_secrets({"NLM_HF_TOKEN": "abcd1234", "OTHER": "x"}) == ["abcd1234"]
    assert environment_secrets({}) == []


def test_library_warnings_go_to_debug_ours_to_warning(caplog):
    import warnings
    from pathlib import Path

    import nlm
    from nlm.config import logging_setup

    setup_logging("INFO", "text")
    logging_setup.hidden_warnings.clear()
    ours = str(Path(nlm.__file__).parent / "models" / "lora.py")
    with caplog.at_level(logging.DEBUG):
        warnings.warn_explicit("old api", FutureWarning, "/venv/site-packages/peft/peft_model.py", 184)
        warnings.warn_explicit("our call is wrong", UserWarning, ours, 90)
    levels = {r.getMessage().split(":")[1].strip().split(" (")[0]: r.levelno for r in caplog.records
              if r.name in ("py.warnings", "nlm.warnings")}
    assert levels == {"old api": logging.DEBUG, "our call is wrong": logging.WARNING}
    assert logging_setup.hidden_warnings == {"FutureWarning": 1}
    logging_setup.hidden_warnings.clear()


def test_only_the_main_process_logs_info(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    setup_logging("INFO", "text")
    assert logging.getLogger().level == logging.WARNING
    monkeypatch.setenv("RANK", "0")
    setup_logging("INFO", "text")
    assert logging.getLogger().level == logging.INFO
