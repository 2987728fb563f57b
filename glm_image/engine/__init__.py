"""Runners that drive the models: the AR prior-token engine and the DiT denoise/decode engine.

Names load lazily: ``glm_image.engine.choices`` (the options a user picks) imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .ar_engine import ArEngine, ArResult
    from .dit_engine import DitEngine

__all__ = ["ArEngine", "ArResult", "DitEngine"]

__getattr__ = lazy_attributes(
    __name__, {"ArEngine": ".ar_engine", "ArResult": ".ar_engine", "DitEngine": ".dit_engine"}
)
