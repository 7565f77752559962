import logging

import pytest
from transformers import AutoConfig

from nlm.config.settings import LoRAConfig
from nlm.errors import ConfigError
from nlm.models.lora import apply_lora, find_lora_targets
from nlm.models.scratch import build_causal_lm

EXPECTED = {
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "granite": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "olmo2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_auto_targets_are_the_attention_and_mlp_projections(model_type):
    model = build_causal_lm(model_type, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4)
    targets = find_lora_targets(model)
    assert set(targets) == EXPECTED[model_type]
    assert "lm_head" not in targets and "embed_out" not in targets
    wrapped = apply_lora(model, LoRAConfig(enabled=True, r=4))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lm_head_only_when_asked():
    model = build_causal_lm("llama", vocab_size=128, hidden_size=32)
    assert "lm_head" in find_lora_targets(model, include_lm_head=True)


def test_user_targets_are_validated_against_the_model():
    model = build_causal_lm("llama", vocab_size=128, hidden_size=32)
    with pytest.raises(ConfigError, match=r"lora.target_modules: c_attn not found in the student; valid names: .*q_proj"):
        apply_lora(model, LoRAConfig(enabled=True, target_modules=["q_proj", "c_attn"]))
    wrapped = apply_lora(model, LoRAConfig(enabled=True, target_modules=["q_proj"]))
    assert any("q_proj.lora_A" in n for n, _ in wrapped.named_parameters())


def _model_without_linear():
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = AutoConfig.for_model("llama", vocab_size=8)
            self.emb = torch.nn.Embedding(8, 4)

        def get_output_embeddings(self):
            return None

    return Tiny()


def test_no_target_falls_back_to_full_fine_tuning_with_a_warning(caplog):
    model = _model_without_linear()
    with caplog.at_level(logging.WARNING):
        assert apply_lora(model, LoRAConfig(enabled=True)) is model
    assert "full fine-tuning" in caplog.text
    with pytest.raises(ConfigError, match="lora.required"):
        apply_lora(model, LoRAConfig(enabled=True, required=True))


def test_trainable_share_is_logged(caplog):
    model = build_causal_lm("llama", vocab_size=128, hidden_size=32)
    with caplog.at_level(logging.INFO):
        apply_lora(model, LoRAConfig(enabled=True, r=2))
    assert "parameters trainable (" in caplog.text
