"""The user's adapter strings: ``PATH[:SCALE]`` (CLI ``--lora``) and ``name=PATH[:SCALE]`` (serve)."""

from __future__ import annotations

import math
import re

from .formats import LoraError

__all__ = ["parse_lora", "parse_named_lora"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_lora(text: str, field: str = "--lora") -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` -> (path, scale); scale 1 when absent. A path may hold ':'
    itself: only a trailing ':<number>' is read as the scale."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            path, scale = text, 1.0
    else:
        path, scale = text, 1.0
    if not path:
        raise LoraError(f"{field} {text!r}: no path; allowed: PATH or PATH:SCALE")
    if not math.isfinite(scale):
        raise LoraError(f"{field} {text!r}: the scale must be a finite number")
    return path, scale


def parse_named_lora(text: str, field: str = "--lora") -> tuple[str, str, float]:
    """``name=PATH[:SCALE]`` -> (name, path, default scale)."""
    name, sep, rest = text.partition("=")
    if not sep or not _NAME.fullmatch(name):
        raise LoraError(
            f"{field} {text!r}: expected NAME=PATH[:SCALE], NAME of letters, digits, '.', '_', '-' "
            f"(at most 64)"
        )
    path, scale = parse_lora(rest, field)
    return name, path, scale
