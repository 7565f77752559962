"""`nlm data inspect --config`: per-source counts of a training mixture."""

import json

from nlm.cli import main
from tests.conftest import write_jsonl


def test_inspect_reports_each_sources_records_and_weight(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}] * 3 + ["not json"])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "hello"}])
    config = tmp_path / "run.yaml"
    config.write_text(f"train_mixture:\n  - {{path: {a}, weight: 3}}\n  - {{path: {b}, name: greet}}\n")
    assert main(["data", "inspect", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["valid"], s["skipped"], s["probability"]) for s in report["sources"]] == [
        ("a", 3, 1, 0.75), ("greet", 1, 0, 0.25)]
    config.write_text(f"train_mixture:\n  - {{path: {a}, weight: 0}}\n")
    assert main(["data", "inspect", "--config", str(config)]) == 2
    assert "train_mixture[0].weight" in capsys.readouterr().err
