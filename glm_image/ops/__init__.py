"""One dispatch point per op family: attention (prefill/joint and decode over the static KV
cache), RMSNorm (+ residual add), LayerNorm + AdaLN modulation, M-RoPE and 2D RoPE, SwiGLU.

Models call ops only through a backend object (``model.ops``); ``select_ops`` picks it once per
engine. ``TorchOps`` (``sdpa``) is the reference every other backend is tested against.
"""

from .registry import BACKENDS, CHOICES, available_backends, select_ops
from .torch_ops import Ops, TorchOps

__all__ = ["BACKENDS", "CHOICES", "Ops", "TorchOps", "available_backends", "select_ops"]
