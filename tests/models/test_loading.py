import pytest
import torch

from nlm.errors import ModelLoadError
from nlm.models.loading import check_model_exists, freeze, load_causal_lm, load_tokenizer, load_trained_model


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=f"model folder {tmp_path}/nope not found"):
        check_model_exists(str(tmp_path / "nope"))


def test_missing_hub_id_offline_gives_hints():
    with pytest.raises(ModelLoadError) as info:
        load_causal_lm("nlm-test-org/definitely-not-a-model")
    message = str(info.value)
    assert "nlm-test-org/definitely-not-a-model" in message and "spelled right" in message and "offline" in message


def test_folder_without_weights(tmp_path, tokenizer, model_dirs):
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((model_dirs["student"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="holds no \\*.safetensors weights"):
        load_trained_model(tmp_path)


def _run_folder(root, model_dirs):
    import shutil

    shutil.copytree(model_dirs["student"], root / "run" / "final")
    (root / "run" / "checkpoint-2").mkdir()
    return root / "run"


@pytest.mark.parametrize("kind, message", [
    ("run", "is a training run folder; its model is {root}/run/final"),
    ("checkpoints", "is a training run folder without final/; pass a checkpoint such as {root}/run/checkpoint-2"),
    ("file", "is a file; expected a model folder"),
    ("data", "is not a model folder: it holds no config.json or adapter_config.json.*found: train.jsonl"),
    ("cache", "is a teacher cache .nlm teacher-cache., not a model"),
])
def test_wrong_folder_kinds_are_usage_errors(tmp_path, model_dirs, kind, message):
    import shutil

    from nlm.errors import ModelPathError

    run = _run_folder(tmp_path, model_dirs)
    if kind == "checkpoints":
        shutil.rmtree(run / "final")
    path = {"run": run, "checkpoints": run, "file": tmp_path / "x.jsonl", "data": tmp_path / "data",
            "cache": tmp_path / "cache"}[kind]
    (tmp_path / "x.jsonl").write_text("{}\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    (tmp_path / "cache" / "shard-00000.safetensors").write_bytes(b"")
    for load in (load_trained_model, check_model_exists, load_tokenizer):
        with pytest.raises(ModelPathError, match=message.format(root=tmp_path)) as info:
            load(str(path))
        assert info.value.exit_code == 2


def test_adapter_whose_base_model_is_gone(tmp_path, model_dirs):
    import json
    import shutil

    from peft import LoraConfig, get_peft_model

    from nlm.errors import ModelPathError

    base = tmp_path / "base"
    shutil.copytree(model_dirs["student"], base)
    adapter = tmp_path / "adapter"
    get_peft_model(load_causal_lm(str(base)), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    shutil.rmtree(base)
    with pytest.raises(ModelPathError, match=f"trained on the base model {base}, which is not found"):
        load_trained_model(adapter)


def test_tokenizer_gets_a_pad_token(model_dirs):
    tokenizer = load_tokenizer(str(model_dirs["student"]))
    assert tokenizer.pad_token_id is not None


def test_dtype_and_freeze(model_dirs):
    model = load_causal_lm(str(model_dirs["teacher"]), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    freeze(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_trust_remote_code_is_off_by_default(tmp_path, model_dirs, monkeypatch):
    import json
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(model_dirs["student"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    config["model_type"] = "nlm-custom"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text("raise RuntimeError('remote code ran')\n")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        check_model_exists(str(folder))
