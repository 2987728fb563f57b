"""Errors a user can cause. Each message names the file or field and what is allowed."""

from __future__ import annotations


class GlmImageError(Exception):
    """Base class of every error this engine raises on purpose."""


class ConfigError(GlmImageError, ValueError):
    """A config file is missing, unreadable, or holds a value the engine cannot run."""


class CheckpointError(GlmImageError, FileNotFoundError):
    """A checkpoint folder or one of its files is missing."""


class CorruptCheckpointError(GlmImageError, ValueError):
    """A weights file exists but cannot be read: truncated, malformed header, bad index."""


class WeightsMismatchError(GlmImageError, ValueError):
    """The tensors in a checkpoint do not match the module they are loaded into."""
