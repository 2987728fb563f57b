"""Quantized weights: formats (``formats``), the scheme a user asks for (``scheme``), and the
quantized linear layer with the policy of what is quantized (``linear``).

``scheme`` imports no torch (the CLI parses ``--quantize`` with it); the rest load lazily.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .scheme import FORMATS, STAGE_FORMATS, QuantScheme, check_device, parse_quantize

if TYPE_CHECKING:
    from .formats import QuantWeight, quantize
    from .linear import QuantLinear, kept_linears, linear_quantizers, quantized_linears

_LAZY = {
    "QuantWeight": ".formats",
    "quantize": ".formats",
    "QuantLinear": ".linear",
    "kept_linears": ".linear",
    "linear_quantizers": ".linear",
    "quantized_linears": ".linear",
}

__all__ = [
    "FORMATS",
    "STAGE_FORMATS",
    "QuantLinear",
    "QuantScheme",
    "QuantWeight",
    "check_device",
    "kept_linears",
    "linear_quantizers",
    "parse_quantize",
    "quantize",
    "quantized_linears",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'glm_image.quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
