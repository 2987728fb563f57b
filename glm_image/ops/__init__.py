"""One dispatch point per op family: attention (prefill/joint and decode over the static KV
cache), RMSNorm (+ residual add), LayerNorm + AdaLN modulation, M-RoPE and 2D RoPE, SwiGLU,
and quantized linears (``quant_linear``: which int8 / int4 / fp8 matmul runs per device, ``ops.quant``).

Models call ops only through a backend object (``model.ops``); ``select_ops`` picks it once per
engine. ``TorchOps`` (``sdpa``) is the reference every other backend is tested against, and its
ops are the kernels' twins. Before another backend serves a (device, dtype), its ops are checked
against the reference once per process (``Ops.verify``, ``selfcheck``): one that fails is
switched off. The quantized matmuls of every backend, ``sdpa``'s included (torch's own), are
checked the same way against ``quant_linear_reference`` (``Ops.verify_quant``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

# The registry imports no torch: the CLI builds its `--attention-backend` choices from it.
from .registry import BACKENDS, CHOICES, available_backends, check_backend, select_ops

if TYPE_CHECKING:
    from .selfcheck import CheckRow, CheckSizes, format_check
    from .torch_ops import Ops, TorchOps

_LAZY = {
    "CheckRow": ".selfcheck",
    "CheckSizes": ".selfcheck",
    "format_check": ".selfcheck",
    "Ops": ".torch_ops",
    "TorchOps": ".torch_ops",
}

__all__ = [
    "BACKENDS",
    "CHOICES",
    "CheckRow",
    "CheckSizes",
    "Ops",
    "TorchOps",
    "available_backends",
    "check_backend",
    "format_check",
    "select_ops",
]


__getattr__ = lazy_attributes(__name__, _LAZY)
