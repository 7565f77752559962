"""argparse types for the command-specific flags: each checks its range and says what it expected."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def non_negative_int(text: str) -> int:
    value = int(number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def temperature(text: str) -> float:
    value = number(text, float)
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError(f"expected a temperature in [0, 2] (0 is greedy), got {text}")
    return value


def positive_float(text: str) -> float:
    value = number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value
