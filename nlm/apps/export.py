"""`nlm export`: a finished run's final/ folder -> merged, int8, int4 or gguf, with export_metadata.json.

One function per step: find the source, load it (LoRA merged), write the format, measure the quality
delta on a held-out file, write the metadata that lists every file written.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nlm.config.paths import record_written
from nlm.errors import ConfigError
from nlm.export.output import EXPORT_METADATA_FILE, prepare_export_dir
from nlm.models.loading import gguf_file_in, is_adapter_dir, load_tokenizer, load_trained_model
from nlm.models.model_info import METADATA_FILE, training_metadata

logger = logging.getLogger(__name__)

FORMATS = ("merged", "int8", "int4", "gguf")


@dataclass
class ExportResult:
    output_dir: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve_source(model: str | Path) -> Path:
    """A run folder's final/, or the model folder itself; it must hold a model nlm can load."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--model {model}: folder not found (expected a run folder or its final/ folder)")
    if (path / "final").is_dir() and not (path / "config.json").is_file():
        path = path / "final"
    if not ((path / "config.json").is_file() or is_adapter_dir(path)):
        raise ConfigError(f"--model {model}: {path} holds neither config.json nor adapter_config.json "
                          "(expected a run folder or its final/ folder)")
    if gguf_file_in(path):
        raise ConfigError(f"--model {model}: a gguf export cannot be exported again; use the run's final/ folder")
    return path.resolve()


def load_plain_model(source: Path, trust_remote_code: bool = False) -> Any:
    """The source as one plain fp32 model: a LoRA adapter is merged into its base (PEFT's merge_and_unload)."""
    model = load_trained_model(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if getattr(model.config, "quantization_config", None):
        raise ConfigError(f"--model {source} is already quantized; export from the run's final/ folder")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()


def folder_bytes(folder: Path, names: list[str] | None = None) -> int:
    """Size of the weight files in `folder` (safetensors and gguf)."""
    files = [folder / n for n in names] if names else [*folder.glob("*.safetensors"), *folder.glob("*.gguf")]
    return sum(f.stat().st_size for f in files if f.is_file() and f.suffix in (".safetensors", ".gguf"))


def _parameter_bytes(model: Any) -> int:
    """Bytes of the model's distinct tensors (a tied embedding and head share storage: counted once)."""
    distinct = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in distinct.values())


def _write_quantized(plain: Any, staging: Path, output: Path, fmt: str, settings: dict[str, Any],
                     trust_remote_code: bool) -> dict[str, Any]:
    """Load the staged `plain` model through TorchAoConfig (transformers quantizes while loading) and save it:
    int8 as torchao's own safetensors, int4 as compressed-tensors' pack-quantized (`nlm.export.packed`)."""
    from transformers import AutoModelForCausalLM

    from nlm.export.quantize import drop_tied_head, embedding_names, group_size_for, torchao_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    group_size = (settings["group_size"] or group_size_for(plain.config, 128)) if fmt == "int4" else None
    if fmt == "int4":
        from nlm.export.packed import compressed_tensors_quantization, write_pack_quantized

        compressed_tensors_quantization()  # before any quantizing: the install line, not a traceback
    quantization = torchao_config(fmt, plain, group_size=group_size,
                                  keep_head_fp=settings["keep_head_fp"], trained_scheme=settings["trained"])
    names = embedding_names(plain)
    model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32, device_map=device,
                                                 quantization_config=quantization,
                                                 trust_remote_code=trust_remote_code)
    common = {"device": device, "quantization_aware": settings["trained"], "group_size": group_size}
    if fmt == "int4":  # torchao's int4 values and scales, stored two per byte
        return {**write_pack_quantized(plain, model, output, group_size, names, settings["keep_head_fp"]), **common}
    model.save_pretrained(output)
    head_quantized = not settings["keep_head_fp"]
    if names["tied"] and head_quantized:
        drop_tied_head(output, names["output"])
    quant_type = quantization.quant_type
    return {"library": "torchao", "config": type(quant_type).__name__, **common,
            "head_and_embedding": "fp32" if not head_quantized else ("quantized, tied (stored once)"
                                                                     if names["tied"] else "quantized"),
            "settings": {k: str(v) for k, v in vars(quant_type).items() if not k.startswith("_")}}


def quantization_settings(source: Path, fmt: str, group_size: int | None, keep_head_fp: bool) -> dict[str, Any]:
    """Group size and scheme of an int8/int4 export; a quantization-aware run's own scheme wins.

    A run trained with `quantization_aware: {scheme: S, group_size: G}` is exported with scheme S and group
    size G (anything else would export a model other than the one trained): another --format or
    --group_size is refused.
    """
    trained = (training_metadata(source).get("config") or {}).get("quantization_aware") or {}
    if trained.get("scheme", "none") == "none":
        return {"group_size": group_size, "keep_head_fp": keep_head_fp, "trained": False}
    if trained["scheme"] != fmt:
        raise ConfigError(f"--format {fmt}: {source} was trained quantization-aware for {trained['scheme']} "
                          f"(training_metadata.json); export it with --format {trained['scheme']} (or merged)")
    if group_size is not None and group_size != trained["group_size"] and fmt == "int4":
        raise ConfigError(f"--group_size {group_size}: {source} was trained with group_size "
                          f"{trained['group_size']}; leave --group_size out")
    if keep_head_fp != bool(trained.get("keep_head_fp", False)):
        raise ConfigError(f"--keep_head_fp {keep_head_fp}: {source} was trained with quantization_aware."
                          f"keep_head_fp: {bool(trained.get('keep_head_fp', False))}; leave the flag out")
    return {"group_size": trained["group_size"], "keep_head_fp": keep_head_fp, "trained": True}


def export_model(
    model: str | Path,
    output: str | Path,
    fmt: str = "merged",
    *,
    quant: str = "f16",
    eval_file: str | Path | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    batch_size: int = 8,
    group_size: int | None = None,
    keep_head_fp: bool = False,
) -> ExportResult:
    """Write `model` (run folder or final/) to `output` in `fmt`; returns the folder and its metadata."""
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if eval_file is not None and not Path(eval_file).is_file():
        raise ConfigError(f"--eval_file {eval_file}: file not found")
    source = resolve_source(model)
    if fmt == "gguf":
        _check_gguf_request(quant)
    settings = quantization_settings(source, fmt, group_size, keep_head_fp) if fmt in ("int8", "int4") else {}
    output_dir = prepare_export_dir(output, overwrite)
    before = set(p.name for p in output_dir.iterdir())

    tokenizer = load_tokenizer(str(source), trust_remote_code=trust_remote_code)
    plain = load_plain_model(source, trust_remote_code)
    reference_bytes = _parameter_bytes(plain)
    details: dict[str, Any] = {}
    if fmt == "merged":
        plain.save_pretrained(output_dir)
    elif fmt == "gguf":
        from nlm.export.gguf import write_gguf

        write_gguf(plain, tokenizer, source, output_dir / f"model-{quant}.gguf", quant)
        details = {"library": "gguf", "quant": quant}
    else:
        # transformers quantizes while loading: stage the plain model in a folder nlm creates and removes.
        with tempfile.TemporaryDirectory(prefix=".nlm-staging-", dir=output_dir) as staging:
            plain.save_pretrained(staging)
            details = _write_quantized(plain, Path(staging), output_dir, fmt, settings, trust_remote_code)
            del plain
    tokenizer.save_pretrained(output_dir)
    if (source / METADATA_FILE).is_file():
        shutil.copy2(source / METADATA_FILE, output_dir / METADATA_FILE)  # lineage + the prompt separator

    files = sorted(p.name for p in output_dir.iterdir() if p.name not in before)
    export_bytes = folder_bytes(output_dir)
    metadata: dict[str, Any] = {
        "format": fmt,
        "quantization": details or None,
        "source": str(source),
        "source_run": _lineage(source),
        "sizes": {"reference_fp32_bytes": reference_bytes, "export_bytes": export_bytes,
                  "ratio": round(export_bytes / reference_bytes, 4) if reference_bytes else None},
        "files": files + [EXPORT_METADATA_FILE],
    }
    if eval_file is not None:
        metadata["quality"] = quality_delta(source, output_dir, Path(eval_file), batch_size, trust_remote_code)
    metadata["seconds"] = round(time.perf_counter() - started, 3)
    (output_dir / EXPORT_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    record_written(output_dir, "nlm export", before)  # the marker owns exactly what this export wrote
    logger.info("%s export written to %s (%.2fx the fp32 size)", fmt, output_dir, metadata["sizes"]["ratio"] or 0)
    return ExportResult(output_dir=output_dir, metadata=metadata)


def _check_gguf_request(quant: str) -> None:
    """Before any model is loaded: the gguf package is there and the quant type is one we write."""
    from nlm.export.gguf import QUANT_TYPES

    if quant not in QUANT_TYPES:
        raise ConfigError(f"--quant {quant!r}: expected one of {', '.join(QUANT_TYPES)}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("--format gguf needs the gguf package: run `pip install 'gguf>=0.17'` "
                          "(or: pip install -e '.[export]' in the nlm checkout)") from None


def _lineage(source: Path) -> dict[str, Any]:
    meta = training_metadata(source)
    config = meta.get("config", {})
    return {"run_name": config.get("run_name"), "student": (meta.get("student") or {}).get("model"),
            "teacher": (meta.get("teacher") or {}).get("model"), "git_commit": meta.get("git_commit"),
            "global_step": meta.get("global_step")} if meta else {}


def quality_delta(source: Path, exported: Path, eval_file: Path, batch_size: int, trust_remote_code: bool) -> dict[str, Any]:
    """Held-out loss and perplexity of the source and the export, both through `nlm eval`'s scorer."""
    from nlm.apps.evaluate import evaluate_model

    before = evaluate_model(source, eval_file, batch_size=batch_size, device="cpu", trust_remote_code=trust_remote_code)
    after = evaluate_model(exported, eval_file, batch_size=batch_size, device="cpu", trust_remote_code=trust_remote_code)
    keys = ("loss", "perplexity", "token_accuracy")
    result: dict[str, Any] = {"eval_file": str(eval_file), "examples": after["examples"],
                              "source": {k: before[k] for k in keys if k in before},
                              "export": {k: after[k] for k in keys if k in after}}
    result["loss_delta"] = after["loss"] - before["loss"]
    result["loss_delta_pct"] = 100 * result["loss_delta"] / before["loss"] if before["loss"] else None
    result["perplexity_delta"] = after["perplexity"] - before["perplexity"]
    logger.info("held-out loss %.4f -> %.4f (%+.2f%%)", before["loss"], after["loss"], result["loss_delta_pct"] or 0)
    return result
