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


def test_folder_without_weights(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="holds no \\*.safetensors weights"):
        load_trained_model(tmp_path)


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
