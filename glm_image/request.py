"""One request type for every entry point: the Python API, the CLI, the HTTP server, the benchmarks.

A ``GenerationRequest`` is what a user asks for (prompt, size, steps, guidance, seed, images
per prompt, condition images and whether to fit them to an allowed size); ``GlmImage.validate_request`` checks it against the loaded
checkpoint and ``GlmImage.run`` / ``GlmImage.run_batch`` carry it out. Requests that share a
``batch_key`` can run as one engine call (the server batches concurrent requests this way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import GlmImageError

__all__ = ["MAX_IMAGES_PER_PROMPT", "GenerationRequest", "parse_size", "shown"]

# Images per prompt in one call: they run as ONE batch (their KV caches and latents side by side),
# so the count is memory. 32 is past what fits a 1024x1024 batch on one 80 GB GPU; beyond it a
# caller wants several calls (the CLI: repeat the prompt in --prompts), not a bigger batch.
MAX_IMAGES_PER_PROMPT = 32

# Exactly WIDTHxHEIGHT in ASCII digits. Normalised: an upper-case X, and spaces around the whole
# value. Refused: spaces inside, signs, underscores, non-ASCII digits (int() takes all of those).
_SIZE = re.compile(r"([0-9]{1,9})[xX]([0-9]{1,9})")


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters (a client's 20 MB field is not echoed back)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past Python's 4300-digit limit; lists nested deep
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


def parse_size(text: str, field: str = "size") -> tuple[int, int]:
    """'1280x1280' (WIDTHxHEIGHT) -> (width, height); the message names ``field``."""
    match = _SIZE.fullmatch(text.strip(" ")) if isinstance(text, str) else None
    if match is None:
        raise GlmImageError(f"{field} = {shown(text)}: expected WIDTHxHEIGHT in ASCII digits, e.g. 1024x1024")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    width: int = 1024
    height: int = 1024
    steps: int = 50
    guidance: float = 1.5
    seed: int | None = None  # the first image's seed; image i uses seed + i; None: random
    num_images: int = 1
    images: tuple = ()  # condition images (PIL images or paths): image-to-image
    fit_images: bool = False  # crop and resize a condition image of a size not allowed to the nearest one
    lora: tuple[tuple[str, float], ...] = ()  # (adapter name or path, scale), unmerged (glm_image.lora)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one engine call (image-to-image runs alone)."""
        # (not ``lora``: requests choosing different adapters share a call, row by row)
        return (self.width, self.height, self.steps, float(self.guidance), id(self) if self.images else None)
