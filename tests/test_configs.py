"""The config gallery (configs/*.yaml) never rots: every file loads through the real parser, opens with a
comment saying what it is for and the command that runs it, and a run of each with tiny local models works."""

import re
from pathlib import Path

import pytest

from nlm.config.sources import load_config, read_yaml_mapping

GALLERY = Path(__file__).resolve().parents[1] / "configs"
# Training configs only: configs/accelerate/ (and any other sub-folder) holds launcher files, not TrainingConfig.
# Pipeline files (a top-level `agents:` list) are loaded by the pipeline parser instead.
PIPELINE_CONFIGS = sorted(p for p in GALLERY.glob("*.yaml") if "agents" in (read_yaml_mapping(p) or {}))
TRAINING_CONFIGS = sorted(p for p in GALLERY.glob("*.yaml") if p not in PIPELINE_CONFIGS)


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_each_pipeline_file_loads_through_the_pipeline_parser(path):
    from nlm.pipeline.spec import load_pipeline

    assert path.read_text().startswith("# ")
    assert load_pipeline(path).agents


def test_the_gallery_has_the_basic_recipes():
    names = {p.name for p in TRAINING_CONFIGS}
    assert {"distill_full.yaml", "distill_lora.yaml", "teacher_cache.yaml", "finetune_baseline.yaml"} <= names


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_each_config_loads_and_says_what_it_is_for(path):
    text = path.read_text()
    assert text.startswith("# "), "open with a comment saying what the file is for"
    header = text.split("\n\n")[0]
    assert re.search(r"nlm [a-z-]+( [a-z]+)? --config configs/" + re.escape(path.name), header), \
        "the opening comment names the command that runs this file"
    config = load_config([], path).config
    data = read_yaml_mapping(path)
    for key in ("teacher_model", "student_model"):
        if key in data:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", data[key]), f"{key} names a hub model"
            assert getattr(config, key) == data[key]
    for spec in data.get("teachers", []):
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", spec["model"]), "teachers name hub models"


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in TRAINING_CONFIGS if p.name != "teacher_cache.yaml"], ids=lambda p: p.name)
def test_each_config_trains_with_tiny_local_models(path, model_dirs, pc_file, tmp_path):
    from nlm.apps.train import train

    data = read_yaml_mapping(path)
    swap = ["--student_model", str(model_dirs["student"]), "--train_file", str(pc_file), "--output_dir", str(tmp_path),
            "--max_steps", "2", "--max_seq_length", "64", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--device_preference", "cpu", "--precision", "fp32",
            "--teacher_precision", "fp32", "--eval_steps", "1", "--save_steps", "1", "--report_to", "none"]
    if "teacher_model" in data:
        swap += ["--teacher_model", str(model_dirs["teacher"])]
    if "teachers" in data:  # the same tiny teacher twice, as local folders, on the CPU
        import json

        swap += ["--teachers", json.dumps([{**spec, "model": str(model_dirs["teacher"]), "device": None} for spec in data["teachers"]])]
    if "train_mixture" in data:  # the same tiny file as two weighted sources
        i = swap.index("--train_file")
        swap[i:i + 2] = ["--train_mixture", f'[{{"path": "{pc_file}", "weight": 3, "name": "a"}}, {{"path": "{pc_file}", "name": "b"}}]']
    if "eval_file" in data:
        swap += ["--eval_file", str(pc_file)]
    result = train(load_config(swap, path).config)
    assert (result.final_dir / "training_metadata.json").is_file()


@pytest.mark.slow
def test_teacher_cache_config_builds_a_cache_and_trains_from_it(model_dirs, pc_file, tmp_path):
    from nlm.cli import main

    path = GALLERY / "teacher_cache.yaml"
    swap = ["--teacher_model", str(model_dirs["teacher"]), "--student_model", str(model_dirs["student"]),
            "--train_file", str(pc_file), "--output_dir", str(tmp_path / "runs"), "--max_seq_length", "64",
            "--device_preference", "cpu", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--report_to", "none"]
    cache = tmp_path / "cache"
    assert main(["teacher-cache", "--config", str(path), "--output", str(cache), "--top_k", "8", *swap]) == 0
    assert main(["train", "--config", str(path), "--teacher_cache", str(cache), "--max_steps", "2", *swap]) == 0
    assert (tmp_path / "runs" / "qwen-0.5b-from-cache" / "final" / "training_metadata.json").is_file()
