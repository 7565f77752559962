"""Nested option mappings as dotted names: `{"distillation": {"alpha": 0.5}}` <-> `distillation.alpha`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted name: leaf value}; an empty mapping is a leaf of its own."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
