"""A device's memory budget: sizes as users write them (``--max-memory 16GB``) and the free
memory a device reports. The planner (``residency``) compares its estimates with these."""

from __future__ import annotations

import re

import torch

from .errors import GlmImageError

__all__ = ["MAX_MEMORY", "device_budget", "parse_memory"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


MAX_MEMORY = 10**18  # 1 EB: above any device; a larger value is a typo, not a budget
_MEMORY_ALLOWED = (
    "allowed: a positive size up to 1000000TB with a unit of B, KB, MB, GB, TB (powers of 1000) or "
    "KiB, MiB, GiB, TiB (powers of 1024), e.g. 16GB"
)


def parse_memory(value: str | int | None, field: str = "max_memory") -> int | None:
    """ "16GB" (10**9), "16GiB" (2**30), "512MB", or a number of bytes -> bytes; None stays None.

    At least one byte and at most ``MAX_MEMORY``; anything else (garbage, a sign, an exponent,
    inf, nan, a number past the float range) is a ``GlmImageError`` starting with ``field``."""
    from decimal import Decimal

    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 < value <= MAX_MEMORY:  # (str() of a 5000-digit integer raises: not written out)
            shown = value if abs(value) < 10**40 else f"an integer of {value.bit_length()} bits"
            raise GlmImageError(f"{field} = {shown}; {_MEMORY_ALLOWED}")
        return value
    text = str(value)
    shown = repr(text) if len(text) <= 40 else repr(text[:37] + "...")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text) if len(text) <= 100 else None
    unit = match.group(2).lower() if match else None
    # Decimal, not float: a string of 400 digits is exact here, where float() would give inf
    size = int(Decimal(match.group(1)) * _UNITS[unit]) if match and unit in _UNITS else 0
    if not 0 < size <= MAX_MEMORY:
        raise GlmImageError(f"{field} = {shown}; {_MEMORY_ALLOWED}")
    return size


def device_budget(device: torch.device | str) -> int | None:
    """Free bytes on ``device``: CUDA / NPU free memory, the host's available memory for a CPU
    (psutil), or None when it cannot be read."""
    device = torch.device(device)
    if device.type in ("cuda", "npu"):
        module = getattr(torch, device.type, None)
        info = getattr(module, "mem_get_info", None)
        return int(info(device)[0]) if callable(info) else None
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)
