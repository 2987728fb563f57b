"""Checking what a user asks for, before any model runs: prompts, sizes, steps, guidance, seeds,
condition images. Every error names the field and the allowed values.

Used by ``GlmImage`` (and through it by the CLI, the server and the benchmarks); the size rule
itself is the checkpoint's (``CheckpointConfig.size_limits``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import SizeLimits
from .errors import GlmImageError
from .sampling.seeds import image_seeds

__all__ = ["MAX_PROMPT_CHARS", "check_generation", "load_condition_images", "request_seeds"]

MAX_PROMPT_CHARS = 1000


def check_generation(
    limits: SizeLimits,
    prompts: Sequence[str],
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    num_images_per_prompt: int,
) -> None:
    """Raise ``GlmImageError`` naming the first field that is not allowed."""
    if not prompts:
        raise GlmImageError("prompt: need at least one prompt")
    for i, prompt in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not isinstance(prompt, str) or not prompt.strip():
            raise GlmImageError(f"{where}: must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise GlmImageError(f"{where}: {len(prompt)} characters; allowed: at most {MAX_PROMPT_CHARS}")
    limits.check_size(height, width)
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise GlmImageError(f"num_inference_steps = {num_inference_steps!r}; allowed: an integer >= 1")
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not guidance_scale >= 1
    ):
        raise GlmImageError(f"guidance_scale = {guidance_scale!r}; allowed: a number >= 1")
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise GlmImageError(f"num_images_per_prompt = {num_images_per_prompt!r}; allowed: an integer >= 1")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def request_seeds(seed: int | Sequence[int] | None, count: int) -> tuple[int, ...]:
    """The API's ``seed``: an int (numbering the images), one int per image, or None (random)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != count or not all(_is_int(s) for s in seed):
            raise GlmImageError(
                f"seed: got {len(seed)} seeds for {count} images; allowed: one integer per image"
            )
    elif seed is not None and not _is_int(seed):
        raise GlmImageError(f"seed = {seed!r}; allowed: an integer, one integer per image, or none")
    return image_seeds(seed, count, field="seed")


def load_condition_images(images, prompts: int, limits: SizeLimits) -> list[list] | None:
    """Normalise ``images`` to one list of RGB PIL images per prompt, checking each one.

    One prompt may take a flat list (or a single image); several prompts take one list each,
    all of the same length (as the reference requires). Paths are opened.
    """
    from PIL import Image

    if images is None or (isinstance(images, (list, tuple)) and len(images) == 0):
        return None
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    nested = all(isinstance(item, (list, tuple)) for item in images)
    if not nested:
        if prompts != 1:
            raise GlmImageError(f"images: with {prompts} prompts, give one list of images per prompt")
        images = [images]
    if len(images) != prompts:
        raise GlmImageError(f"images: {len(images)} lists for {prompts} prompts; need one per prompt")
    if len({len(group) for group in images}) != 1 or not images[0]:
        raise GlmImageError("images: every prompt needs the same number (>= 1) of condition images")
    out = []
    for i, group in enumerate(images):
        converted = []
        for j, item in enumerate(group):
            where = f"images[{i}][{j}]" if prompts > 1 else f"images[{j}]"
            try:
                image = item if isinstance(item, Image.Image) else Image.open(item)
                image = image.convert("RGB")
            except (OSError, ValueError, TypeError) as e:
                raise GlmImageError(f"{where}: not a readable image ({e})") from None
            limits.check(f"{where} height", image.height)
            limits.check(f"{where} width", image.width)
            if max(image.size) > 4 * min(image.size):
                raise GlmImageError(
                    f"{where}: aspect ratio {image.width}x{image.height}; allowed: at most 4:1"
                )
            converted.append(image)
        out.append(converted)
    return out
