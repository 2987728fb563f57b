"""The engines' options a user chooses from, with their defaults: importable without torch, so the
command line can offer them (``glm_image.options``) without loading anything."""

from __future__ import annotations

from ..errors import GlmImageError

__all__ = ["DECODE_STEPS", "DECODINGS", "DEFAULT_WINDOW", "DRAFT_INITS", "check_decoding", "check_jacobi"]

# How the AR decode loop runs its steps (``ArEngine(decode_step=...)``):
#   auto   - a device graph where the device has one (CUDA, Ascend), else eager
#   eager  - one Python-driven step per token (the cache's unused tail is skipped)
#   static - the graph's step run eagerly, on any device: what a graph replays, checkable on a CPU
#   graph  - a device graph, required: an error where it cannot be captured
DECODE_STEPS = ("auto", "eager", "static", "graph")

# How tokens are chosen: one per forward (the reference's way, seed for seed), or speculative
# Jacobi windows (the same distribution, fewer forwards; ``engine.jacobi``)
DECODINGS = ("sequential", "jacobi")

# Tokens per Jacobi forward: measured (random weights, sharp synthetic model) to flatten at 8
DEFAULT_WINDOW = 8

# Where a draft comes from when no forward has computed its position yet:
#   last    - drawn from the window's last distribution (exact and structure-free)
#   above   - the token one grid row above (either grid); row 0 as ``last``
#   preview - target grid: the preview token at the same place (the preview upsampled);
#             preview grid: as ``above``
DRAFT_INITS = ("last", "above", "preview")


def check_jacobi(window: int, drafts: str) -> None:
    """The Jacobi options a user gives, checked before any work."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise GlmImageError(f"jacobi_window = {window!r} must be an integer >= 1")
    if drafts not in DRAFT_INITS:
        raise GlmImageError(f"jacobi_drafts = {drafts!r}; allowed: {', '.join(DRAFT_INITS)}")


def check_decoding(decoding: str, window: int = DEFAULT_WINDOW, drafts: str = "last") -> None:
    if decoding not in DECODINGS:
        raise GlmImageError(f"ar_decoding = {decoding!r}; allowed: {', '.join(DECODINGS)}")
    if decoding == "jacobi":
        check_jacobi(window, drafts)
