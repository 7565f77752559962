"""nlm export: merged == PEFT's merged logits, int8/int4 reload with no flags, gguf round trips through
transformers' GGUF reader, the output folder is never clobbered."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nlm.apps.export import export_model
from nlm.commands.export import Options, run
from nlm.config.settings import LoRAConfig
from nlm.errors import ConfigError, RunExistsError
from nlm.models.loading import load_trained_model
from nlm.models.lora import apply_lora
from nlm.models.scratch import build_causal_lm
from tests.conftest import CORPUS, write_jsonl

TEXT = "the quick brown fox jumps over the lazy dog"


def _logits(model, tokenizer, text=TEXT):
    with torch.no_grad():
        return model(tokenizer(text, return_tensors="pt")["input_ids"]).logits


@pytest.fixture(scope="module")
def lora_final(tmp_path_factory, model_dirs, tokenizer):
    """A LoRA run's final/ folder: an adapter with non-zero B (as after training) over the student."""
    final = tmp_path_factory.mktemp("run") / "final"
    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dirs["student"]), LoRAConfig(enabled=True, r=4))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (final / "training_metadata.json").write_text(json.dumps(
        {"config": {"run_name": "r1", "prompt_separator": "\n"}, "student": {"model": "s"}, "git_commit": "abc"}))
    return final


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    rows = [{"prompt": line[:20], "completion": line[20:]} for line in CORPUS[:8]]
    return write_jsonl(tmp_path_factory.mktemp("data") / "heldout.jsonl", rows)


def test_merged_equals_the_adapter_model_and_is_a_plain_folder(lora_final, tokenizer, tmp_path):
    reference = _logits(load_trained_model(lora_final), tokenizer)
    result = export_model(lora_final.parent, tmp_path / "merged", "merged")  # the run folder resolves to final/
    out = result.output_dir
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), tokenizer), reference, rtol=1e-4, atol=1e-5)
    meta = json.loads((out / "export_metadata.json").read_text())
    assert meta["format"] == "merged" and meta["source"] == str(lora_final.resolve())
    assert meta["source_run"]["run_name"] == "r1" and meta["source_run"]["git_commit"] == "abc"
    assert set(meta["files"]) == {p.name for p in out.iterdir()} - {".nlm-folder.json"}
    assert (out / "training_metadata.json").is_file()  # lineage and the prompt separator travel along


@pytest.mark.parametrize("fmt,tolerance", [("int8", 0.05), pytest.param("int4", 0.5, marks=pytest.mark.slow)])
def test_quantized_export_reloads_with_no_flags_and_reports_its_delta(model_dirs, tokenizer, heldout, tmp_path, fmt, tolerance):
    reference = _logits(load_trained_model(model_dirs["student"]), tokenizer)
    result = export_model(model_dirs["student"], tmp_path / fmt, fmt, eval_file=heldout)
    model = load_trained_model(result.output_dir)  # the loader nlm eval/generate/serve use, no extra flag
    library = {"int8": "torchao", "int4": "compressed-tensors"}[fmt]  # int4: two values per byte (export/packed.py)
    assert json.loads((result.output_dir / "config.json").read_text())["quantization_config"]["quant_method"] == library
    assert (_logits(model, tokenizer) - reference).abs().max() < tolerance
    meta = result.metadata
    assert meta["quantization"]["library"] == library
    if fmt == "int8":
        assert meta["sizes"]["ratio"] <= 0.6
    quality = meta["quality"]
    assert quality["examples"] == 8 and quality["loss_delta"] == pytest.approx(quality["export"]["loss"] - quality["source"]["loss"])
    assert abs(quality["loss_delta_pct"]) < (2 if fmt == "int8" else 20)


@pytest.mark.parametrize("quant,tolerance", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_gguf_round_trips_through_transformers(tokenizer, tmp_path, quant, tolerance):
    from transformers import LlamaConfig

    source = tmp_path / "gqa"  # grouped-query attention, as real Llama-family models have
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    reference = _logits(AutoModelForCausalLM.from_pretrained(source), tokenizer)

    out = export_model(source, tmp_path / "gguf", "gguf", quant=quant).output_dir
    gguf_file = f"model-{quant}.gguf"
    assert (out / gguf_file).is_file()
    alone = tmp_path / "alone"  # the .gguf on its own, as llama.cpp/Ollama users get it
    alone.mkdir()
    shutil.copy(out / gguf_file, alone / gguf_file)
    back = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf_file, dtype=torch.float32)
    back_tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf_file)
    for text in CORPUS[:4]:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert back_tokenizer.eos_token_id == tokenizer.eos_token_id
    torch.testing.assert_close(_logits(back, tokenizer), reference, rtol=0, atol=tolerance)
    torch.testing.assert_close(_logits(load_trained_model(out), tokenizer), reference, rtol=0, atol=tolerance)


def test_gguf_refuses_architectures_it_does_not_cover(tokenizer, tmp_path):
    build_causal_lm("gpt2", vocab_size=len(tokenizer), hidden_size=32).save_pretrained(tmp_path / "g")
    tokenizer.save_pretrained(tmp_path / "g")
    with pytest.raises(ConfigError, match="gguf export supports llama, mistral, qwen2 models; this one is 'gpt2'"):
        export_model(tmp_path / "g", tmp_path / "out", "gguf")


def test_bad_requests_fail_before_loading(model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="--model .*folder not found"):
        export_model(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ConfigError, match="--eval_file .*not found"):
        export_model(model_dirs["student"], tmp_path / "out", "int8", eval_file=tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="neither config.json nor adapter_config.json"):
        export_model(tmp_path, tmp_path / "out")


def test_output_folder_is_never_clobbered(model_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(RunExistsError, match="not created by nlm.*notes.txt"):
            export_model(model_dirs["student"], out, overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    fresh = tmp_path / "fresh"
    export_model(model_dirs["student"], fresh)
    with pytest.raises(RunExistsError, match="already holds an export"):
        export_model(model_dirs["student"], fresh, "int8")
    (fresh / "notes.txt").write_text("mine")  # a user's file next to the export survives --overwrite
    export_model(model_dirs["student"], fresh, "int8", overwrite=True)
    assert json.loads((fresh / "export_metadata.json").read_text())["format"] == "int8"
    assert (fresh / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in json.loads((fresh / "export_metadata.json").read_text())["files"]


def test_an_export_from_before_the_markers_is_adopted_by_its_metadata(model_dirs, tmp_path):
    from nlm.config.paths import MARKER

    old = tmp_path / "old"
    export_model(model_dirs["student"], old)
    (old / MARKER).unlink()  # as an export written before the markers existed
    (old / "notes.txt").write_text("mine")
    export_model(model_dirs["student"], old, overwrite=True)
    assert (old / "notes.txt").read_text() == "mine" and (old / "model.safetensors").is_file()


def test_export_command_prints_a_json_summary(model_dirs, tmp_path, capsys):
    assert run(Options(model=str(model_dirs["student"]), output=str(tmp_path / "o"), format="merged")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["format"] == "merged" and summary["ratio"] == pytest.approx(1.0, abs=0.02), summary  # + the safetensors header


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "gguf"])
def test_nlm_eval_and_generate_load_an_export_with_no_extra_flag(model_dirs, heldout, tmp_path, fmt):
    import subprocess
    import sys

    out = export_model(model_dirs["student"], tmp_path / fmt, fmt, quant="q8_0").output_dir
    def nlm(*args):
        done = subprocess.run([sys.executable, "-m", "nlm.cli", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    scored = json.loads(nlm("eval", "--model", str(out), "--data", str(heldout), "--json"))
    assert scored["examples"] == 8 and scored["loss"] > 0
    assert nlm("generate", "--model", str(out), "--prompt", "the quick brown", "--max_new_tokens", "4").strip()


def test_nlm_export_on_the_command_line(model_dirs, tmp_path, capsys):
    from nlm.cli import main

    assert main(["export", "--model", str(model_dirs["student"]), "--output", str(tmp_path / "o"), "--format", "merged"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "merged"
    assert main(["export", "--model", str(model_dirs["student"]), "--output", str(tmp_path / "o")]) == 2  # not empty
    assert main(["export", "--model", "x", "--output", "y", "--format", "int3"]) == 2


def test_reference_size_counts_a_tied_head_once(tokenizer, tmp_path):
    model = build_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    sizes = export_model(tmp_path / "tied", tmp_path / "out").metadata["sizes"]
    assert sizes["ratio"] == pytest.approx(1.0, abs=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_int8_quantizes_the_head_and_embedding_and_keeps_a_tied_pair_tied(tokenizer, tmp_path, tied):
    source = tmp_path / "wide"  # vocabulary large against the width: the head and embedding dominate the bytes
    build_causal_lm("llama", vocab_size=1024, hidden_size=64, tie_word_embeddings=tied).save_pretrained(source)
    tokenizer.save_pretrained(source)
    reference = _logits(load_trained_model(source), tokenizer)
    full = export_model(source, tmp_path / "int8", "int8")
    kept = export_model(source, tmp_path / "kept", "int8", keep_head_fp=True)
    model = load_trained_model(full.output_dir)
    head, table = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert type(table).__name__ == "IntxUnpackedToInt8Tensor" and type(head).__name__ != "Parameter"
    assert (head is table) == tied
    assert full.metadata["quantization"]["head_and_embedding"] == ("quantized, tied (stored once)" if tied else "quantized")
    assert full.metadata["sizes"]["ratio"] <= 0.3 < kept.metadata["sizes"]["ratio"]
    assert (_logits(model, tokenizer) - reference).abs().max() < 0.05
    assert type(load_trained_model(kept.output_dir).get_input_embeddings().weight) is torch.nn.Parameter
