"""int4 exports pack two values per byte (compressed-tensors pack-quantized) and are still torchao's int4 model:
the packed folder, loaded back with a plain from_pretrained, gives the logits of the unpacked torchao model."""

import json
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from nlm.apps.export import export_model
from nlm.errors import ConfigError, ModelLoadError
from nlm.export.packed import compressed_tensors_quantization
from nlm.export.quantize import torchao_config
from nlm.models.loading import load_trained_model
from nlm.models.scratch import build_causal_lm
from tests.conftest import CORPUS

pytest.importorskip("compressed_tensors", reason="int4 exports need compressed-tensors (pip install -e '.[export]')")


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("tied,keep_head_fp", [(False, False), (True, False), (False, True), (True, True)])
def test_the_packed_export_is_the_torchao_int4_model(tokenizer, tmp_path, tied, keep_head_fp):
    source = tmp_path / "source"
    plain = build_causal_lm("llama", vocab_size=512, hidden_size=64, tie_word_embeddings=tied, seed=5)
    plain.save_pretrained(source)
    tokenizer.save_pretrained(source)
    unpacked = AutoModelForCausalLM.from_pretrained(  # torchao's int4 model of the same weights, in memory
        source, dtype=torch.float32, quantization_config=torchao_config("int4", plain, group_size=32,
                                                                        keep_head_fp=keep_head_fp)).eval()
    exported = export_model(source, tmp_path / "int4", "int4", group_size=32, keep_head_fp=keep_head_fp)
    out = exported.output_dir

    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["config_groups"]["linears"]["format"] == "pack-quantized"
    tensors = _tensors(out)
    packed = tensors["model.layers.0.mlp.up_proj.weight_packed"]
    rows, columns = tensors["model.layers.0.mlp.up_proj.weight_shape"].tolist()
    assert packed.dtype == torch.int32 and packed.numel() * 4 == rows * columns // 2  # two int4 values per byte
    assert not any(key.endswith("qdata") for key in tensors)
    table = tensors["model.embed_tokens.weight"]
    assert table.dtype == (torch.float32 if keep_head_fp else torch.int8)
    if tied:  # stored once: the int8 table and the head's row scales, or the fp32 table alone
        assert "lm_head.weight" not in tensors and ("lm_head.weight_scale" in tensors) != keep_head_fp
    elif keep_head_fp:
        assert tensors["lm_head.weight"].dtype == torch.float32

    back = load_trained_model(out)  # the loader nlm eval/generate/serve use, no extra flag
    assert type(back.model.layers[0].mlp.up_proj.weight) is torch.nn.Parameter  # decompressed when loaded
    if tied and keep_head_fp:
        assert back.lm_head.weight is back.model.embed_tokens.weight
    batch = tokenizer(CORPUS[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, got = unpacked(**batch).logits, back(**batch).logits
        assert (expected - plain(**batch).logits).abs().max() > 1e-3  # int4 does change the model
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert exported.metadata["quantization"]["library"] == "compressed-tensors"


def test_int4_is_smaller_than_int8(tokenizer, tmp_path):
    source = tmp_path / "source"
    build_causal_lm("llama", vocab_size=512, hidden_size=64, seed=5).save_pretrained(source)
    tokenizer.save_pretrained(source)
    ratios = {fmt: export_model(source, tmp_path / fmt, fmt, group_size=32 if fmt == "int4" else None)
              .metadata["sizes"]["ratio"] for fmt in ("int8", "int4")}
    assert ratios["int4"] < 0.75 * ratios["int8"], ratios


def test_a_missing_compressed_tensors_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "compressed_tensors.quantization", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"--format int4 needs compressed-tensors: run `pip install"):
        compressed_tensors_quantization()


def test_a_compressed_tensors_without_its_decompressor_is_a_load_error(tokenizer, tmp_path, monkeypatch):
    """The folder declares compressed-tensors: a library that lost `decompress_model` fails the load in one line
    instead of leaving the weights compressed (head reads before the first forward would be wrong)."""
    from compressed_tensors.compressors import ModelCompressor

    source = tmp_path / "source"
    build_causal_lm("llama", vocab_size=512, hidden_size=64, seed=5).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = export_model(source, tmp_path / "int4", "int4", group_size=32).output_dir
    monkeypatch.delattr(ModelCompressor, "decompress_model")
    with pytest.raises(ModelLoadError, match=r"int4.*declares compressed-tensors.*decompress_model") as caught:
        load_trained_model(out)
    assert "\n" not in str(caught.value)
