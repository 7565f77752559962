import pytest

from nlm.cli import main
from nlm.entrypoints import sagemaker_serve as entrypoint


def test_sagemaker_serve_entry_point_binds_all_interfaces_on_8080(monkeypatch):
    seen = {}
    monkeypatch.setattr("nlm.cli.main", lambda args: seen.setdefault("args", args) and 0)
    entrypoint.main(["serve"])
    assert seen["args"][:5] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    seen.clear()
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "9090")
    entrypoint.main(["--max_batch_size", "4"])
    assert seen["args"] == ["serve", "--host", "0.0.0.0", "--port", "9090", "--max_batch_size", "4"]


def test_serve_without_a_model_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "model folder" in capsys.readouterr().err


def test_serve_with_an_unset_key_variable_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NLM_TEST_UNSET_KEY", raising=False)
    assert main(["serve", "--model", str(tmp_path), "--api_key_env", "NLM_TEST_UNSET_KEY"]) == 2
    assert "NLM_TEST_UNSET_KEY: that environment variable is not set" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--port", "--max_batch_size", "--max_concurrent_requests"])
def test_serve_rejects_non_positive_limits(tmp_path, capsys, flag):
    assert main(["serve", "--model", str(tmp_path), flag, "0"]) == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "m", "--data", "d", "--batch_size", "0"], "expected an integer >= 1"),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "3"], "expected a temperature in [0, 2]"),
    (["generate", "--model", "m", "--prompt", "p", "--max_new_tokens", "many"], "expected an integer, got 'many'"),
    (["data", "inspect", "f", "--max_seq_length", "-4"], "expected an integer >= 1"),
    (["demo", "--seed", "-1"], "expected an integer >= 0"),
])
def test_command_flags_are_range_checked(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_model_specs_name_each_model(tmp_path):
    from nlm.inference.settings import parse_model_specs

    (tmp_path / "kd").mkdir()
    assert parse_model_specs([str(tmp_path / "kd")]) == (("kd", tmp_path / "kd"),)
    assert parse_model_specs([str(tmp_path / "kd")], "student") == (("student", tmp_path / "kd"),)
    assert parse_model_specs([f"a={tmp_path / 'kd'}", f"b={tmp_path}/x=y"]) == (("a", tmp_path / "kd"), ("b", tmp_path / "x=y"))
    odd = tmp_path / "v=2"
    odd.mkdir()
    assert parse_model_specs([str(odd)]) == (("v=2", odd),)  # an existing folder with '=' in its name stays a path


def test_serve_with_two_models_of_one_name_or_a_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["serve", "--model", f"a={tmp_path}", "--model", f"a={tmp_path}"]) == 2
    assert "the name 'a' is used twice" in capsys.readouterr().err
    assert main(["serve", "--model", f"b={tmp_path / 'missing'}", "--model", f"a={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and "not found" in err and len(err.strip().splitlines()) == 1
    # a folder that exists but holds no model is named too (checked before the server starts)
    assert main(["serve", "--model", f"a={tmp_path}"]) == 2
    assert f"{tmp_path} is not a model folder" in capsys.readouterr().err
