"""Quantization-aware distillation: the fake-quantized student is the model the export writes."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from nlm.apps.export import export_model
from nlm.config.settings import QuantizationAwareConfig
from nlm.errors import ConfigError
from nlm.models.loading import load_trained_model
from nlm.models.scratch import build_causal_lm
from nlm.training.quantization_aware import prepare_student, strip_fake_quantizers
from tests.conftest import CORPUS


def _loss(model, tokenizer):
    batch = tokenizer(CORPUS[:4], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


@pytest.mark.slow
@pytest.mark.parametrize("scheme,tied", [("int4", False), ("int8", False), ("int4", True)])
def test_the_fake_quantized_loss_is_the_loss_of_the_export(tokenizer, tmp_path, scheme, tied):
    plain = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64, tie_word_embeddings=tied, seed=3)
    settings = QuantizationAwareConfig(scheme=scheme, group_size=32)
    student = prepare_student(copy.deepcopy(plain), settings)
    kinds = {type(m).__name__ for m in student.modules()}
    assert {"FakeQuantizedLinear", "FakeQuantizedEmbedding"} <= kinds and "Linear" not in kinds
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == tied
    fake = _loss(student, tokenizer)
    ids = tokenizer(CORPUS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the quantizers do change the forward
        assert (student(ids).logits - plain(ids).logits).abs().max() > 1e-4

    final = tmp_path / "final"  # what nlm train writes: plain modules, the scheme in the metadata
    strip_fake_quantizers(student).save_pretrained(final)
    assert {type(m).__name__ for m in student.modules()} >= {"Linear", "Embedding"}
    tokenizer.save_pretrained(final)
    (final / "training_metadata.json").write_text(json.dumps({"config": {"quantization_aware": settings.model_dump()}}))
    exported = export_model(final, tmp_path / scheme, scheme)
    assert exported.metadata["quantization"]["quantization_aware"] is True
    # torchao's fake quantizer and its real quantizer round alike: equal up to float rounding.
    assert _loss(load_trained_model(exported.output_dir), tokenizer) == pytest.approx(fake, rel=1e-4)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(final).state_dict()["model.norm.weight"],
                               plain.state_dict()["model.norm.weight"])


def test_a_trained_scheme_refuses_another_export_format(tokenizer, tmp_path):
    final = tmp_path / "final"
    build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64).save_pretrained(final)
    tokenizer.save_pretrained(final)
    (final / "training_metadata.json").write_text(json.dumps(
        {"config": {"quantization_aware": {"scheme": "int4", "group_size": 32, "keep_head_fp": False}}}))
    with pytest.raises(ConfigError, match="trained quantization-aware for int4.*--format int4"):
        export_model(final, tmp_path / "o8", "int8")
    with pytest.raises(ConfigError, match="--group_size 64: .*trained with group_size 32"):
        export_model(final, tmp_path / "o4", "int4", group_size=64)


def test_a_group_size_the_widths_do_not_allow_is_a_config_error(tokenizer):
    model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=48)
    with pytest.raises(ConfigError, match=r"quantization_aware.group_size 32: .*\[48\]"):
        prepare_student(model, QuantizationAwareConfig(scheme="int4", group_size=32))


def test_lora_with_quantization_aware_is_refused_with_exit_2(tmp_path, capsys):
    from nlm.cli import main

    config = tmp_path / "qad.yaml"
    config.write_text("student_model: s\nteacher_model: s\ntrain_file: t.jsonl\noutput_dir: " + str(tmp_path)
                      + "\nlora: {enabled: true}\nquantization_aware: {scheme: int4, group_size: 32}\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "quantization_aware with lora.enabled is not supported" in capsys.readouterr().err
