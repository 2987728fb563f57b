"""Runners that drive the models: the AR prior-token engine (and, later, the DiT engine)."""

from .ar_engine import ArEngine, ArResult

__all__ = ["ArEngine", "ArResult"]
