"""The engines' options a user chooses from, with their defaults: importable without torch, so the
command line can offer them (``glm_image.options``) without loading anything."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import GlmImageError

__all__ = [
    "DECODE_STEPS",
    "DECODINGS",
    "DEFAULT_CONTINUED",
    "DEFAULT_COUPLED",
    "DEFAULT_DRAFTS",
    "DEFAULT_WINDOW",
    "DIT_CACHES",
    "DRAFT_INITS",
    "MAX_WINDOW",
    "JacobiDrafts",
    "StepCacheOptions",
    "check_decoding",
    "check_jacobi",
]

# How the AR decode loop runs its steps (``ArEngine(decode_step=...)``):
#   auto   - a device graph where the device has one (CUDA, Ascend), else eager
#   eager  - one Python-driven step per token (the cache's unused tail is skipped)
#   static - the graph's step run eagerly, on any device: what a graph replays, checkable on a CPU
#   graph  - a device graph, required: an error where it cannot be captured
DECODE_STEPS = ("auto", "eager", "static", "graph")

# How tokens are chosen: one per forward (the reference's way, seed for seed), or speculative
# Jacobi windows (the same distribution, fewer forwards; ``engine.jacobi``)
DECODINGS = ("sequential", "jacobi")

# Tokens per Jacobi forward. With continuation a wider window keeps converging drafts further
# ahead, so it needs fewer forwards. Measured (random weights, sharpened tiny model, 512x512,
# continued, seeds 0-1; ``benchmarks/jacobi_forwards.py``), forwards / sequential at T 0.5 / 0.9 /
# 1.2: W 8 0.496 / 0.376 / 0.246, W 16 0.546 / 0.333 / 0.158, W 32 0.376 / 0.186 / 0.102, W 64
# 0.533 / 0.222 / 0.071; seeds 2-5 at T 0.5: W 8 0.633, W 16 0.454, W 32 0.521. 32 never raised
# the forwards over 8; 16 and 64 did at T 0.5. At the released depth one row's forward reads the
# same 16 GB of weights for 32 tokens as for 8 (compute-bound only past ~300 tokens a forward on
# an H100), so fewer forwards are less time; on a CPU the tiny model's vocabulary-sized work per
# token grows with W instead (measure with ``bench ar``; pass ``jacobi_window=8`` there).
DEFAULT_WINDOW = 32
# The most a user may ask for: each forward carries the window's tokens and, per row, W draft
# distributions over the image vocabulary (64 x 16512 floats = 4 MB a row), and measured it
# helps no more than 32 (published SJD variants use 16 to 32). A window longer than the tokens
# left is cut to them (``ArEngine.generate``).
MAX_WINDOW = 64

# Where a draft comes from when no forward has computed its position yet:
#   last    - drawn from the window's last distribution (exact and structure-free)
#   above   - the token one grid row above (either grid); row 0 as ``last``
#   preview - target grid: the preview token at the same place (the preview upsampled);
#             preview grid: as ``above``
DRAFT_INITS = ("last", "above", "preview")
DEFAULT_DRAFTS = "last"

# How a draft is renewed when a forward recomputes its distribution (``engine.jacobi``; each is
# exact, ``sampling.speculative`` says why):
#   coupled   - every draft of a position uses that position's one uniform (MC-SJD's coupling):
#               it changes only when its distribution moved across that uniform
#   continued - past the first rejection the old draft is kept with probability min(1, p/q_old),
#               else redrawn from the residual (SJD-PAC's continuation; MC-SJD's maximal coupling)
# Defaults: on only where measured never to raise the forwards. Sharpened tiny model, 512x512,
# W = 8, 2 seeds, forwards / sequential: T 0.5 / 0.9 / 1.2 plain 0.533 / 0.477 / 0.333,
# continued 0.496 / 0.376 / 0.246; coupled alone 0.390 at T 0.9, and with continued 0.552 /
# 0.387 / 0.251 (it then draws only a position's first draft), so it stays off. The first drafts
# ``above`` / ``preview`` with continued: 0.482 / 0.394 / 0.315 and 0.485 / 0.417 / 0.313 (the
# sharpened model has no spatial structure to copy), so ``last`` stays the default.
DEFAULT_COUPLED = False
DEFAULT_CONTINUED = True


def check_jacobi(
    window: int, drafts: str, coupled: bool = DEFAULT_COUPLED, continued: bool = DEFAULT_CONTINUED
) -> None:
    """The Jacobi options a user gives, checked before any work."""
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise GlmImageError(f"jacobi_window = {window!r}; allowed: an integer from 1 to {MAX_WINDOW}")
    if drafts not in DRAFT_INITS:
        raise GlmImageError(f"jacobi_drafts = {drafts!r}; allowed: {', '.join(DRAFT_INITS)}")
    for name, value in (("jacobi_coupled", coupled), ("jacobi_continued", continued)):
        if not isinstance(value, bool):
            raise GlmImageError(f"{name} = {value!r}; allowed: true or false")


@dataclass(frozen=True)
class JacobiDrafts:
    """Where Jacobi drafts come from and how they are renewed, as one value that crosses the
    stages (``stages.ArCall``): ``drafts`` one of ``DRAFT_INITS``, ``coupled`` and ``continued``
    as above. ``kwargs()`` are ``ArEngine.generate``'s names for them."""

    drafts: str = DEFAULT_DRAFTS
    coupled: bool = DEFAULT_COUPLED
    continued: bool = DEFAULT_CONTINUED

    def check(self) -> None:
        check_jacobi(DEFAULT_WINDOW, self.drafts, self.coupled, self.continued)

    def kwargs(self) -> dict:
        return {
            "jacobi_drafts": self.drafts,
            "jacobi_coupled": self.coupled,
            "jacobi_continued": self.continued,
        }

    def describe(self) -> str:
        """e.g. ``drafts last, continued`` (PNG text, logs)."""
        renewals = [name for name, on in (("coupled", self.coupled), ("continued", self.continued)) if on]
        return ", ".join([f"drafts {self.drafts}", *renewals])


def check_decoding(
    decoding: str,
    window: int = DEFAULT_WINDOW,
    drafts: str = DEFAULT_DRAFTS,
    coupled: bool = DEFAULT_COUPLED,
    continued: bool = DEFAULT_CONTINUED,
) -> None:
    if decoding not in DECODINGS:
        raise GlmImageError(f"ar_decoding = {decoding!r}; allowed: {', '.join(DECODINGS)}")
    if decoding == "jacobi":
        check_jacobi(window, drafts, coupled, continued)


# DiT step caching (``engine.step_cache``): none, or the first-block cache
DIT_CACHES = ("none", "fbcache")


@dataclass(frozen=True)
class StepCacheOptions:
    """What a user sets. The defaults are TeaCache's and cache-dit's for GLM-Image (measured there
    on the released weights: threshold 0.12-0.24, 4-8 warm-up steps, at most 3 cached in a row)."""

    threshold: float = 0.12  # relative L1 change of block 0's residual below which a row reuses
    warmup: int = 4  # the first steps always run every block
    max_consecutive: int = 3  # cached steps in a row, per row, before one runs every block again
    taylor: bool = False  # extrapolate the cached residual to first order (TaylorSeer)

    def check(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise GlmImageError(f"dit_cache threshold = {t!r}; allowed: a number >= 0 (0: never cache)")
        for name, value in (("warmup", self.warmup), ("max_consecutive", self.max_consecutive)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise GlmImageError(f"dit_cache {name} = {value!r}; allowed: an integer >= 0")
        if not isinstance(self.taylor, bool):
            raise GlmImageError(f"dit_cache taylor = {self.taylor!r}; allowed: true or false")
