"""User mistakes every command meets early: one line naming the file/option, exit 2, before any model loads.

Models given here are hub ids that do not exist (offline): had a command loaded its model first, the error
would be about the model (exit 1), so each test also shows the order of the checks.
"""

import json
import os
import shutil

import pytest

from nlm.cli import main

GHOST = "nlm-test-org/not-a-model"


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nlm: error: "), err
    return err[0]


@pytest.mark.parametrize("kind", ["missing", "directory"])
@pytest.mark.parametrize("args, option", [
    (["train", "--teacher_model", GHOST, "--student_model", GHOST, "--train_file", "{path}"], "--train_file"),
    (["train", "--teacher_model", GHOST, "--student_model", GHOST, "--train_file", "{good}", "--eval_file", "{path}"],
     "--eval_file"),
    (["eval", "--model", GHOST, "--data", "{path}"], "--data"),
    (["teacher-cache", "--teacher", GHOST, "--train_file", "{path}", "--output", "{out}"], "--train_file"),
    (["data", "inspect", "{path}"], "file"),
    (["teacher-generate", "--teacher_model", GHOST, "--data", "{path}", "--output", "{out}/gen.jsonl"], "--data"),
])
def test_a_bad_data_file_is_a_usage_error_naming_it(tmp_path, capsys, pc_file, args, option, kind):
    path = tmp_path / "nope.jsonl" if kind == "missing" else tmp_path
    argv = [a.format(path=path, good=pc_file, out=tmp_path / "out") for a in args]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert f"{option} {path}" in line
    assert ("file not found" if kind == "missing" else "is a directory, expected a JSONL file") in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_data_file_is_a_usage_error(tmp_path, capsys, pc_file):
    locked = tmp_path / "locked.jsonl"
    shutil.copy(pc_file, locked)
    locked.chmod(0)
    assert main(["eval", "--model", GHOST, "--data", str(locked)]) == 2
    assert "cannot be read" in _one_error_line(capsys)


@pytest.mark.parametrize("text, message", [
    ("", "is empty (or only comments): expected a mapping of option: value"),
    ("# nothing yet\n", "is empty (or only comments)"),
    ("- teacher_model: a\n- student_model: b\n", "expected a mapping of option: value, found a list"),
    ("just text\n", "expected a mapping of option: value, found str"),
])
@pytest.mark.parametrize("command", [["train"], ["config", "show"], ["serve"]])
def test_empty_or_non_mapping_yaml_is_a_usage_error(tmp_path, capsys, text, message, command):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert main([*command, "--config", str(config)]) == 2
    line = _one_error_line(capsys)
    assert str(config) in line and message in line


def test_wrong_model_folder_kinds_are_usage_errors(tmp_path, capsys, model_dirs, pc_file):
    run = tmp_path / "run"
    shutil.copytree(model_dirs["student"], run / "final")
    assert main(["generate", "--model", str(run), "--prompt", "hi"]) == 2
    assert f"is a training run folder; its model is {run / 'final'}" in _one_error_line(capsys)
    assert main(["eval", "--model", str(tmp_path), "--data", str(pc_file)]) == 2
    assert "is not a model folder" in _one_error_line(capsys)
    assert main(["train", "--student_model", str(pc_file), "--distillation.alpha", "0", "--train_file", str(pc_file),
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "is a file; expected a model folder" in _one_error_line(capsys)
    assert main(["serve", "--model", str(run)]) == 2
    assert f"is a training run folder; its model is {run / 'final'}" in _one_error_line(capsys)


def _without_chat_template(source, target):
    shutil.copytree(source, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_messages_data_or_chat_without_a_chat_template(tmp_path, capsys, model_dirs):
    plain = _without_chat_template(model_dirs["student"], tmp_path / "plain")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    assert main(["eval", "--model", str(plain), "--data", str(chat)]) == 2
    assert "need a tokenizer with a chat template" in _one_error_line(capsys)
    assert main(["generate", "--model", str(plain), "--prompt", "hi", "--chat"]) == 2
    assert "has no chat template; drop --chat" in _one_error_line(capsys)
    assert main(["generate", "--model", str(model_dirs["student"]), "--prompt", "hi", "--chat", "--raw"]) == 2
    assert "--chat and --raw exclude each other" in _one_error_line(capsys)


def test_generate_chat_equals_transformers_on_the_templated_prompt(model_dirs, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dirs["student"]
    assert main(["generate", "--model", str(folder), "--prompt", "what is two plus two?", "--chat",
                 "--max_new_tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "what is two plus two?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|assistant|>")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    assert out == tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) + "\n"
