"""Runners that drive the models: the AR prior-token engine and the DiT denoise/decode engine."""

from .ar_engine import ArEngine, ArResult
from .dit_engine import DitEngine

__all__ = ["ArEngine", "ArResult", "DitEngine"]
