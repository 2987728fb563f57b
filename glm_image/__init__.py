"""glm-image: a local inference engine for GLM-Image (AR prior tokens + DiT decoder)."""

__version__ = "0.1.0"

from .config import CheckpointConfig
from .errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    GlmImageError,
    WeightsMismatchError,
)
from .pipeline import GenerationOutput, GlmImage

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpointError",
    "GenerationOutput",
    "GlmImage",
    "GlmImageError",
    "WeightsMismatchError",
    "__version__",
]
