"""The one progress-callback type of the engine, its stages and its entry points."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress"]

# progress(stage, done, total), called as work advances: stage "ar" counts the tokens the AR
# model has written, "dit" the denoising steps taken. Called on the thread doing the work.
Progress = Callable[[str, int, int], None]
