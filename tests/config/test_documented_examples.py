"""Every configuration form the documentation shows is accepted: a documented form that fails is a defect.

The examples are read from the documents themselves, not copied here: every ```yaml block of README.md and
docs/*.md and every training file of configs/, plus the alternatives their comments name — a commented-out
`# key: value` line, a `# or VALUE` remark and an `a | b | c` list after a value. Each variant goes through the
YAML source here (fast); the slow test sends every value of it through the environment and the command line
too and checks that the three sources build the same configuration.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from nlm.config.sources import known_keys, load_config

ROOT = Path(__file__).resolve().parents[2]
KEYS = known_keys()
# Words a `# or ...` remark uses as prose, not as a value.
PROSE = {"a", "an", "the", "any", "none", "not", "its", "one", "your"}


@dataclass(frozen=True)
class Example:
    where: str  # "README.md block 3, line 4: or cosine"
    text: str   # the YAML text of the variant


def _blocks() -> list[tuple[str, str]]:
    """(name, YAML text) of every training configuration the documentation shows."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, match in enumerate(re.finditer(r"```ya?ml\n(.*?)```", doc.read_text(), re.S), 1):
            found.append((f"{doc.relative_to(ROOT)} yaml block {number}", match.group(1)))
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        found.append((str(path.relative_to(ROOT)), path.read_text()))
    training = []
    for name, text in found:
        data = yaml.safe_load(text)
        # Pipeline files (agents:) and launcher files (accelerate's compute_environment:) are other formats.
        if isinstance(data, dict) and not {"agents", "compute_environment"} & set(data):
            training.append((name, text))
    return training


def _dotted(lines: list[str], index: int) -> str:
    """The dotted option name of the `key:` on lines[index], from the keys above it with less indentation."""
    line = lines[index]
    indent = len(line) - len(line.lstrip())  # of the key, or of the `#` that comments it out
    key = re.match(r"\s*#?\s*([a-z_][a-z0-9_]*):", line).group(1)
    parts = [key]
    for above in reversed(lines[:index]):
        match = re.match(r"( *)([a-z_][a-z0-9_]*):\s*(#.*)?$", above)
        if match and len(match.group(1)) < indent:
            parts.insert(0, match.group(2))
            indent = len(match.group(1))
    return ".".join(parts)


def _alternative_values(comment: str) -> list[str]:
    """The values a comment offers: `or cosine`, `or uld, hybrid`, `linear | step | root`, `or {0: 1, 1: 3}`."""
    comment = re.sub(r"\([^)]*\)", "", comment)  # explanations in parentheses
    if "|" in comment:
        return [piece.split()[0].strip("`:;,.") for piece in comment.split("|") if piece.split()]
    values = []
    for match in re.finditer(r"(?:^|[;,]\s*)or\s+(\{[^}]*\}|[A-Za-z0-9_.\-/]+)((?:\s*[,/]\s*[A-Za-z0-9_.\-]+)*)", comment):
        first, rest = match.group(1), match.group(2)
        values += [first] + [v for v in re.split(r"\s*[,/]\s*", rest) if v]
    return [v for v in values if v.lower() not in PROSE]


def examples() -> list[Example]:
    out = []
    for name, text in _blocks():
        out.append(Example(f"{name} as written", text))
        lines = text.splitlines()
        for index, line in enumerate(lines):
            commented = re.match(r"(\s*)#\s?([a-z_][a-z0-9_]*):\s+(\S.*)$", line)
            if commented and _dotted(lines, index) in KEYS:
                # Uncomment it, dropping the live line of the same option it replaces.
                indent, key = commented.group(1), commented.group(2)
                variant = [other for other in lines if not re.match(rf"{indent}{key}:", other)]
                variant = [indent + line.strip().removeprefix("#").strip() if other is line else other
                           for other in variant]
                out.append(Example(f"{name} line {index + 1}: {line.strip()}", "\n".join(variant)))
                continue
            live = re.match(r"(\s*)([a-z_][a-z0-9_]*):\s+([^#{\[\s][^#]*?)\s+#\s*(.*)$", line)
            if not live or _dotted(lines, index) not in KEYS:
                continue
            indent, key, comment = live.group(1), live.group(2), live.group(4)
            alternative_key = re.match(r"or\s+([a-z_][a-z0-9_]*):\s*(\S+)", comment)
            if alternative_key and alternative_key.group(1) in KEYS:
                replaced = f"{indent}{alternative_key.group(1)}: {alternative_key.group(2)}"
                out.append(Example(f"{name} line {index + 1}: {comment}",
                                   "\n".join(replaced if other is line else other for other in lines)))
                continue
            for value in _alternative_values(comment):
                replaced = f"{indent}{key}: {value}"
                out.append(Example(f"{name} line {index + 1}: {key}: {value}",
                                   "\n".join(replaced if other is line else other for other in lines)))
    return out


EXAMPLES = examples()


def test_the_examples_include_the_forms_the_docs_name():
    wheres = " ".join(example.where for example in EXAMPLES)
    for needle in ("layers: {0: 1, 1: 3}", "loss: cosine", "cross_tokenizer: uld", "cross_tokenizer: hybrid",
                   "teacher_mixture: route", "pacing: step", "order: hard_first", "mixture_size: 50000",
                   "hybrid_matched_weight: 1.0", "temperature_mode: learned"):
        assert needle in wheres, needle


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_documented_example_loads_from_yaml(example, tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(example.text)
    if "tune" in (yaml.safe_load(example.text) or {}):
        # A `tune:` file is read by `nlm tune`: its training part as `nlm train` reads it, and its search checked.
        from nlm.tune.spec import load_tune

        load_tune(path)
    else:
        load_config([], path)


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in KEYS:
            flat.update(_leaves(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _as_text(value: object) -> str:
    """How a user types the value in a shell: YAML's flow form for mappings/lists (JSON works too)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip() if isinstance(value, dict) \
            else json.dumps(value)
    return str(value)


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_documented_example_gives_the_same_config_from_env_and_cli(example, tmp_path, monkeypatch):
    document = yaml.safe_load(example.text)
    document.pop("tune", None)  # `nlm tune`'s section is read from the file only (its flags are its own)
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    from_yaml = load_config([], path).config.model_dump(mode="json")
    leaves = _leaves(document)
    flags = [f"--{key}={_as_text(value)}" for key, value in leaves.items()]
    assert load_config(flags).config.model_dump(mode="json") == from_yaml
    for key, value in leaves.items():
        monkeypatch.setenv("NLM_" + key.upper().replace(".", "__"), _as_text(value))
    assert load_config([]).config.model_dump(mode="json") == from_yaml
