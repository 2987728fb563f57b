"""glm-image: a local inference engine for GLM-Image (AR prior tokens + DiT decoder)."""

from .config import CheckpointConfig
from .errors import CheckpointError, ConfigError, CorruptCheckpointError, GlmImageError, WeightsMismatchError

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpointError",
    "GlmImageError",
    "WeightsMismatchError",
    "__version__",
]
