"""Typed, frozen configs for every component of a GLM-Image checkpoint.

Each dataclass is built from the checkpoint's own JSON file (diffusers layout: one folder per
component, ``model_index.json`` at the root) and validated on construction: a missing key, a
value of the wrong type or a value the engine cannot run raises :class:`ConfigError` naming the
file, the key and what is allowed.

Keys that do not change inference (``_class_name``, ``initializer_range``, dropout, ...) are
listed per class as ``_IGNORED``. Any other key we do not know is kept in ``unknown`` (so nothing
is lost and ``glm-image info`` can show it) but is never read by the engine.
"""

from __future__ import annotations

from ._base import read_json
from .checkpoint import PIPELINE_COMPONENTS, CheckpointConfig, SizeLimits
from .components import (
    ArConfig,
    ArTextConfig,
    DitConfig,
    GenerationSettings,
    GlyphConfig,
    ImageProcessorConfig,
    PromptTokens,
    SchedulerConfig,
    VaeConfig,
    VisionConfig,
    VqConfig,
)

__all__ = [
    "PIPELINE_COMPONENTS",
    "ArConfig",
    "ArTextConfig",
    "CheckpointConfig",
    "DitConfig",
    "GenerationSettings",
    "GlyphConfig",
    "ImageProcessorConfig",
    "PromptTokens",
    "SchedulerConfig",
    "SizeLimits",
    "VaeConfig",
    "VisionConfig",
    "VqConfig",
    "read_json",
]
