"""`nlm eval`'s scoring equals a direct computation from full logits, chunked or not."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from nlm.apps.evaluate import evaluate_model
from nlm.data.tokenize import TokenizeSettings, tokenize_records
from nlm.models.scratch import build_causal_lm


def _reference_loss(folder, data_file, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    total, count = 0.0, 0
    for example in tokenize_records([data_file], tokenizer, TokenizeSettings()).dataset:
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor(example["labels"][1:])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        keep = labels != -100
        total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count, count


@pytest.mark.parametrize("model_type, extra", [("llama", {}), ("granite", {"logits_scaling": 4.0})])
def test_eval_matches_full_logits(tmp_path, tokenizer, pc_file, model_type, extra):
    folder = tmp_path / model_type
    build_causal_lm(model_type, vocab_size=len(tokenizer), hidden_size=32, num_layers=1, seed=7, **extra).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = evaluate_model(folder, pc_file, teacher_path=folder, batch_size=5, device="cpu")
    expected, count = _reference_loss(folder, pc_file, tokenizer)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["teacher_kl"] == pytest.approx(0.0, abs=1e-5) and result["teacher_agreement"] == 1.0
