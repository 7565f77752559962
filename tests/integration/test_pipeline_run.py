"""`nlm pipeline run` end to end: real `nlm train` child processes on tiny models, one agent failing."""

import json
import shutil

import pytest
import yaml

from nlm.commands.pipeline_run import Options, run
from tests.conftest import write_jsonl

pytestmark = pytest.mark.slow


def test_team_of_students(model_dirs, pc_file, tmp_path, capsys):
    # A student folder whose tokenizer loads but whose weights are missing: that agent fails inside its run.
    broken = tmp_path / "broken_student"
    broken.mkdir()
    for item in model_dirs["student"].iterdir():
        if "safetensors" not in item.name:
            shutil.copy2(item, broken / item.name)
    words = write_jsonl(tmp_path / "words.jsonl", [{"text": f"the quick brown fox number {i}"} for i in range(12)])
    out = tmp_path / "team"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "defaults": {"teacher_model": str(model_dirs["teacher"]), "student_model": str(model_dirs["student"]),
                     "output_dir": str(out), "train_file": str(pc_file), "eval_split": 0.25, "max_steps": 2,
                     "per_device_train_batch_size": 4, "learning_rate": 1e-3, "device_preference": ["cpu"],
                     "save_strategy": "no"},
        "teacher_cache": {"top_k": 8},
        "agents": [
            {"name": "math"},
            {"name": "math_lora", "lora": {"enabled": True, "r": 4}, "devices": 2},  # a torchrun job
            {"name": "words", "train_file": str(words), "distillation": {"alpha": 0.0}},
            {"name": "broken", "student_model": str(broken), "distillation": {"alpha": 0.0}},
        ],
    }))
    assert run(Options(pipeline=str(pipeline), parallel=2)) == 1
    report = json.loads((out / "pipeline_report.json").read_text())
    agents = {a["name"]: a for a in report["agents"]}
    assert {n: a["status"] for n, a in agents.items()} == {
        "math": "finished", "math_lora": "finished", "words": "finished", "broken": "failed"}
    assert "broken_student" in agents["broken"]["error"] and "\n" not in agents["broken"]["error"]
    for name in ("math", "math_lora", "words"):
        metadata = json.loads((out / name / "final" / "training_metadata.json").read_text())
        assert metadata["config"]["run_name"] == name and "eval_loss" in agents[name]["metrics"]
        assert agents[name]["final_dir"] == str(out / name / "final") and agents[name]["wall_seconds"] > 0
    lora = json.loads((out / "math_lora" / "final" / "training_metadata.json").read_text())
    assert lora["world_size"] == 2 and lora["config"]["lora"]["enabled"]
    # Shared work: one teacher cache for the two agents with the same teacher and data, used by both runs.
    caches = [s for s in report["shared"] if s["kind"] == "teacher_cache"]
    assert len(caches) == 1 and sorted(caches[0]["agents"]) == ["math", "math_lora"] and caches[0]["status"] == "ready"
    for name in ("math", "math_lora"):
        metadata = json.loads((out / name / "final" / "training_metadata.json").read_text())
        assert metadata["teacher"]["teacher_cache"] == caches[0]["path"] and metadata["loss_impl"]
    assert "teacher_cache" not in agents["words"]["shared"]  # alpha 0: no teacher, no cache
    # ... and one tokenisation per data fingerprint.
    tokenized = {s["fingerprint"]: sorted(s["agents"]) for s in report["shared"] if s["kind"] == "tokenized"}
    assert sorted(tokenized.values()) == [["broken", "math", "math_lora"], ["words"]]
    assert len(list((out / ".cache" / "tokenized").iterdir())) == 2
    markdown = (out / "pipeline_report.md").read_text()
    assert "| broken | failed |" in markdown and "| math | finished |" in markdown
    printed = capsys.readouterr().out
    assert "broken: failed" in printed and "report:" in printed

    # A re-run skips finished agents and retries the failed one only.
    assert run(Options(pipeline=str(pipeline), only=["math", "broken"])) == 1
    again = {a["name"]: a for a in json.loads((out / "pipeline_report.json").read_text())["agents"]}
    assert set(again) == {"math", "broken"}
    assert again["math"]["status"] == "skipped" and again["math"]["metrics"] == agents["math"]["metrics"]
    assert again["broken"]["status"] == "failed"
