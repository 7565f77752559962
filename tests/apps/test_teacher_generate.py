"""`nlm teacher-generate`: the library function and the command module, on a real tiny teacher and real files."""

import json

import pytest

from nlm.apps.teacher_generate import TeacherGenerateSettings, generate_teacher_data
from nlm.apps.train import train
from nlm.commands.teacher_generate import Options, run
from nlm.config.sources import load_config
from nlm.errors import ConfigError
from tests.conftest import write_jsonl

PROMPTS = [
    {"prompt": "question: what is 1 plus 1?"},
    "{not json",
    {"prompt": "hello world,", "completion": "an old answer that is replaced"},
    {"prompt": 3},
    {"text": "the quick brown fox"},
    {"messages": [{"role": "user", "content": "what is two plus two?"},
                  {"role": "assistant", "content": "an old reply that is rewritten"}]},
]


def _settings(**kw):
    return TeacherGenerateSettings(**{"max_new_tokens": 5, "batch_size": 2, "seed": 1, **kw})


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_record_per_valid_prompt_in_input_shape(model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    report = generate_teacher_data(str(model_dirs["teacher"]), data, out, _settings(num_return_sequences=2),
                                   device="cpu", progress_bar=False)
    records = _lines(out)
    assert report.prompts == 4 and report.records == 8 == len(records)
    assert report.read["skipped"] == {"invalid_json": 1, "wrong_type": 1}  # reported like the reader does
    assert [r.get("prompt") for r in records[:6]] == ["question: what is 1 plus 1?"] * 2 + ["hello world,"] * 2 + ["the quick brown fox"] * 2
    assert all(isinstance(r["completion"], str) and r["completion"] != "an old answer that is replaced" for r in records[:6])
    chat = records[6]["messages"]
    assert chat[0] == {"role": "user", "content": "what is two plus two?"} and chat[1]["role"] == "assistant"
    assert chat[1]["content"] != "an old reply that is rewritten" and len(chat) == 2


def test_same_seed_same_file_and_a_stopped_run_resumes_to_the_same_file(model_dirs, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question: what is {i} plus {i}?"} for i in range(7)])
    whole = tmp_path / "whole.jsonl"
    generate_teacher_data(str(model_dirs["teacher"]), data, whole, _settings(), device="cpu", progress_bar=False)

    import nlm.models.sampling as sampling  # imported inside the function: patch the source module

    calls = []

    original = sampling.sample_completions

    def stop_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_completions", stop_after_two)
    stopped = tmp_path / "stopped.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_teacher_data(str(model_dirs["teacher"]), data, stopped, _settings(), device="cpu", progress_bar=False)
    monkeypatch.setattr(sampling, "sample_completions", original)
    assert len(_lines(stopped)) == 4
    with stopped.open("a") as handle:  # a batch half written when the process died
        handle.write('{"prompt": "question: what is 4 pl')
    report = generate_teacher_data(str(model_dirs["teacher"]), data, stopped, _settings(), device="cpu", progress_bar=False)
    assert report.resumed_at == 4 and report.records == 7
    assert stopped.read_bytes() == whole.read_bytes()
    again = generate_teacher_data(str(model_dirs["teacher"]), data, stopped, _settings(), device="cpu", progress_bar=False)
    assert again.resumed_at == 7 and stopped.read_bytes() == whole.read_bytes()  # complete: nothing to do


def test_never_replaces_a_file_it_did_not_write(model_dirs, tmp_path):
    from nlm.errors import FolderNotOwnedError

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}])
    mine = tmp_path / "mine.jsonl"
    mine.write_text("precious\n")
    for overwrite in (False, True):  # not continued, and not replaced even when asked
        with pytest.raises(FolderNotOwnedError, match="was not written by nlm"):
            generate_teacher_data(str(model_dirs["teacher"]), data, mine, _settings(), device="cpu",
                                  progress_bar=False, overwrite=overwrite)
    assert mine.read_text() == "precious\n"
    ours = tmp_path / "ours.jsonl"
    generate_teacher_data(str(model_dirs["teacher"]), data, ours, _settings(), device="cpu", progress_bar=False)
    generate_teacher_data(str(model_dirs["teacher"]), data, ours, _settings(), device="cpu", progress_bar=False,
                          overwrite=True)
    assert len(_lines(ours)) == 1
    with pytest.raises(ConfigError, match="other data, teacher or settings"):
        generate_teacher_data(str(model_dirs["teacher"]), data, ours, _settings(max_new_tokens=3), device="cpu",
                              progress_bar=False)


@pytest.mark.slow
def test_command_output_trains_with_nlm_train(model_dirs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question: what is {i} plus {i}?"} for i in range(6)] + [
        {"messages": [{"role": "user", "content": "hello world"}]}])
    out = tmp_path / "seqkd.jsonl"
    code = run(Options(teacher_model=str(model_dirs["teacher"]), data=str(data), output=str(out), max_new_tokens=6,
                       temperature=0.7, num_return_sequences=2, device="cpu"))
    assert code == 0 and "14 records for 7 prompts" in capsys.readouterr().out
    config = load_config(["--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
                          "--train_file", str(out), "--output_dir", str(tmp_path / "runs"), "--max_steps", "2",
                          "--per_device_train_batch_size", "4", "--save_strategy", "no"]).config
    result = train(config)
    metadata = json.loads((result.final_dir / "training_metadata.json").read_text())
    assert metadata["data"]["train_examples"] == 14 and metadata["global_step"] == 2


def test_options_check_ranges():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Options(teacher_model="t", data="d", output="o", num_return_sequences=0)
    with pytest.raises(ValidationError):
        Options(teacher_model="t", data="d", output="o", top_p=0)


def test_through_the_command_line(model_dirs, tmp_path, capsys):
    from nlm.cli import main

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}, "oops", {"prompt": "question: what is"}])
    out = tmp_path / "out.jsonl"
    assert main(["teacher-generate", "--teacher_model", str(model_dirs["teacher"]), "--data", str(data), "--output",
                 str(out), "--max_new_tokens", "3", "--temperature", "0", "--device", "cpu"]) == 0
    assert "2 records for 2 prompts" in capsys.readouterr().out and len(_lines(out)) == 2
    assert main(["teacher-generate", "--teacher_model", "t", "--data", str(data), "--output", str(out),
                 "--num_return_sequences", "0"]) == 2
    assert "num_return_sequences" in capsys.readouterr().err
