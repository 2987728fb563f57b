"""glm-image: a local inference engine for GLM-Image (AR prior tokens + DiT decoder).

The public API. Names load lazily, so ``import glm_image`` (and ``glm-image --help``) does not
import torch: the first use of ``GlmImage`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes
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


__getattr__ = lazy_attributes(__name__, _EXPORTS)
