"""One request type for every entry point: the Python API, the CLI, the HTTP server, the benchmarks.

A ``GenerationRequest`` is what a user asks for (prompt, size, steps, guidance, seed, images
per prompt, condition images); ``GlmImage.validate_request`` checks it against the loaded
checkpoint and ``GlmImage.run`` / ``GlmImage.run_batch`` carry it out. Requests that share a
``batch_key`` can run as one engine call (the server batches concurrent requests this way).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GlmImageError

__all__ = ["GenerationRequest", "parse_size"]


def parse_size(text: str, field: str = "size") -> tuple[int, int]:
    """'1280x1280' (WIDTHxHEIGHT) -> (width, height); the message names ``field``."""
    parts = str(text).lower().split("x")
    try:
        width, height = (int(v) for v in parts)
    except ValueError:
        raise GlmImageError(f"{field} = {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    return width, height


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

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one engine call (image-to-image runs alone)."""
        return (self.width, self.height, self.steps, float(self.guidance), id(self) if self.images else None)
