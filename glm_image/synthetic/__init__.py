"""Synthetic checkpoints: the released file layout with random weights, for tests and speed runs."""

from .checkpoint import PRESETS, make_checkpoint, preset_dir, randomize_
from .sharp import sharpen_ar
from .tokenizer import build_glm_tokenizer

__all__ = ["PRESETS", "build_glm_tokenizer", "make_checkpoint", "preset_dir", "randomize_", "sharpen_ar"]
