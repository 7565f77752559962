"""Pipeline files: merging defaults with agent overrides, and one-line errors for malformed files."""

import pytest
import yaml

from nlm.errors import ConfigError
from nlm.pipeline.spec import deep_merge, load_pipeline


def write(tmp_path, document):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    return path


def test_agents_override_defaults_deeply(tmp_path):
    path = write(tmp_path, {
        "defaults": {"teacher_model": "t", "output_dir": str(tmp_path / "out"), "lora": {"enabled": True, "r": 8},
                     "max_steps": 10},
        "agents": [{"name": "math", "train_file": "m.jsonl", "lora": {"r": 4}}, {"name": "words", "devices": 2}],
    })
    pipeline = load_pipeline(path)
    math, words = pipeline.agents
    assert math.document["lora"] == {"enabled": True, "r": 4} and math.document["max_steps"] == 10
    assert math.document["run_name"] == "math" and math.document["output_dir"] == str(tmp_path / "out")
    assert words.devices == 2 and "devices" not in words.document and words.document["lora"]["r"] == 8
    assert pipeline.state_dir == tmp_path / "out" / ".pipeline"
    assert [a.name for a in pipeline.select(["words"])] == ["words"]
    with pytest.raises(ConfigError, match="--only nope: no such agent .* math, words"):
        pipeline.select(["nope"])


def test_deep_merge_leaves_its_inputs_alone():
    base = {"lora": {"r": 8}}
    assert deep_merge(base, {"lora": {"alpha": 1}}) == {"lora": {"r": 8, "alpha": 1}} and base == {"lora": {"r": 8}}


@pytest.mark.parametrize("document, message", [
    ({"defaults": {}}, "agents: Field required"),
    ({"agents": []}, "agents: List should have at least 1 item"),
    ({"agents": [{"name": "a"}], "extra": 1}, "extra: Extra inputs are not permitted"),
    ({"agents": [{"name": "../x"}]}, r"agents\[0\].name: must be a single folder name"),
    ({"agents": [{"name": "a"}, {"name": "a"}]}, "agent name a is used more than once"),
    ({"agents": [{"name": "a", "run_name": "b"}]}, "agent 'a' sets run_name"),
    ({"agents": [{"name": "a", "output_dir": "o"}]}, "agent 'a' sets output_dir"),
    ({"agents": [{"name": "a", "devices": 0}]}, r"agents\[0\].devices: Input should be greater than or equal to 1"),
    ({"defaults": {"resume": True}, "agents": [{"name": "a"}]}, "defaults.resume is not allowed"),
    ("agents: [unclosed", "line 1: not valid YAML"),
])
def test_malformed_pipelines_are_one_line_errors(tmp_path, document, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_pipeline(write(tmp_path, document))
    assert "\n" not in str(info.value)


def test_the_example_pipeline_loads():
    from pathlib import Path

    pipeline = load_pipeline(Path(__file__).resolve().parents[2] / "configs" / "pipeline.yaml")
    assert [a.name for a in pipeline.agents] == ["full", "lora", "reverse_kl"] and pipeline.teacher_cache.top_k == 64
    assert pipeline.agents[1].document["lora"] == {"enabled": True, "r": 16}


def test_pipeline_run_command_line(tmp_path, capsys):
    from nlm.cli import main

    assert main(["pipeline", "run", str(tmp_path / "missing.yaml")]) == 2
    assert "pipeline file" in capsys.readouterr().err
    path = write(tmp_path, {"agents": [{"name": "a"}]})
    assert main(["pipeline", "run", str(path), "--parallel", "0"]) == 2
    assert "parallel" in capsys.readouterr().err
    assert main(["pipeline", "run", str(path), "--only", "b"]) == 2
    assert "--only b: no such agent" in capsys.readouterr().err
