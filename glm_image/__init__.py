"""glm-image: a local inference engine for GLM-Image (AR prior tokens + DiT decoder).

The public API. Names load lazily, so ``import glm_image`` (and ``glm-image --help``) does not
import torch: the first use of ``GlmImage`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from .config import CheckpointConfig
    from .errors import (
        CheckpointError,
        ConfigError,
        CorruptCheckpointError,
        GlmImageError,
        WeightsMismatchError,
    )
    from .pipeline import GenerationOutput, GlmImage
    from .request import GenerationRequest

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointConfig": ".config",
    "CheckpointError": ".errors",
    "ConfigError": ".errors",
    "CorruptCheckpointError": ".errors",
    "GenerationOutput": ".pipeline",
    "GenerationRequest": ".request",
    "GlmImage": ".pipeline",
    "GlmImageError": ".errors",
    "WeightsMismatchError": ".errors",
}

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpointError",
    "GenerationOutput",
    "GenerationRequest",
    "GlmImage",
    "GlmImageError",
    "WeightsMismatchError",
    "__version__",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'glm_image' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
