"""Checking what a user asks for, before any model runs: prompts, sizes, steps, guidance, seeds,
condition images. Every error names the field and the allowed values.

Used by ``GlmImage`` (and through it by the CLI, the server and the benchmarks); the size rule
itself is the checkpoint's (``CheckpointConfig.size_limits``). The CLI runs ``check_request``
on every request before it loads the model.

A prompt is data, never control tokens: ``plain_text`` breaks every special-token string of a
tokenizer (``<|image|>``, ``</s>``, ...) with a WORD JOINER (U+2060) after its first character,
so the tokenizer reads it as ordinary text; a prompt without such a string is passed on
unchanged (and tokenized exactly as the reference does).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .config import SizeLimits
from .engine.choices import StepCacheOptions
from .errors import GlmImageError
from .request import MAX_IMAGES_PER_PROMPT, GenerationRequest, shown
from .sampling.seeds import image_seeds

__all__ = [
    "MAX_GUIDANCE",
    "MAX_IMAGES_PER_PROMPT",
    "MAX_PROMPT_CHARS",
    "IdleCacheWarning",
    "check_generation",
    "check_guidance",
    "check_request",
    "control_strings",
    "fitted_size",
    "idle_step_cache",
    "load_condition_images",
    "open_condition_image",
    "plain_text",
    "request_seeds",
    "to_rgb",
]

MAX_PROMPT_CHARS = 1000
# Classifier-free guidance: 1 (off) .. 20. Peers allow 0..20; our CFG runs the unconditional
# branch only for g > 1 (uncond + g * (cond - uncond)), so 1 is the floor. 20 is the peers' cap:
# larger values only saturate the image, and far beyond (1e30) the latents overflow to Inf.
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 20.0
MAX_ASPECT = 4  # condition images: the long side at most 4x the short one
WORD_JOINER = "\u2060"  # invisible, no line break; in no tokenizer's special tokens

log = logging.getLogger(__name__)


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
        _check_prompt(prompt, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    limits.check_size(height, width)
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise GlmImageError(f"num_inference_steps = {shown(num_inference_steps)}; allowed: an integer >= 1")
    check_guidance(guidance_scale)
    if not _is_int(num_images_per_prompt) or not 1 <= num_images_per_prompt <= MAX_IMAGES_PER_PROMPT:
        raise GlmImageError(
            f"num_images_per_prompt = {shown(num_images_per_prompt)}; allowed: an integer in "
            f"1..{MAX_IMAGES_PER_PROMPT} (one batch; make several calls for more)"
        )


def _check_prompt(prompt: object, where: str) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise GlmImageError(f"{where}: must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise GlmImageError(f"{where}: {len(prompt)} characters; allowed: at most {MAX_PROMPT_CHARS}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: from a JSON "\ud800" or undecodable argv bytes
        raise GlmImageError(
            f"{where}: not valid Unicode text (a lone surrogate {prompt[e.start]!a} at character "
            f"{e.start}); allowed: text that encodes as UTF-8"
        ) from None


def check_guidance(value: object, field: str = "guidance_scale") -> None:
    """Guidance is a real number in MIN_GUIDANCE..MAX_GUIDANCE (no bool, NaN or Inf)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not MIN_GUIDANCE <= value <= MAX_GUIDANCE  # False for NaN
    ):
        raise GlmImageError(
            f"{field} = {shown(value)}; allowed: a number in {MIN_GUIDANCE:g}..{MAX_GUIDANCE:g} (1: no guidance)"
        )


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
        raise GlmImageError(f"seed = {shown(seed)}; allowed: an integer, one integer per image, or none")
    return image_seeds(seed, count, field="seed")


class IdleCacheWarning(UserWarning):
    """DiT step caching was asked for where it cannot skip a single step."""


def idle_step_cache(cache: StepCacheOptions | None, steps: int) -> str | None:
    """Why ``cache`` cannot skip any of ``steps`` denoising steps (a message that starts with the
    option to change), or None when it can, or is off.

    The cache reuses a step only after its ``warmup`` steps, and never when ``max_consecutive``
    is 0: the request then runs every block of every step, as without the cache. A threshold of
    0 is the documented way to turn it off and is not reported.
    """
    if cache is None or not _is_int(steps):
        return None
    if cache.max_consecutive == 0:
        return "dit_cache max_consecutive = 0 lets no step be cached: the step cache changes nothing"
    if steps <= cache.warmup:
        return (
            f"dit_cache warmup = {cache.warmup} covers all {steps} steps, so no step is cached: the "
            f"step cache changes nothing; allowed to cache: a warm-up below the steps"
        )
    return None


def check_request(limits: SizeLimits, request: GenerationRequest) -> GenerationRequest:
    """Check every field of ``request``; returns it with its condition images opened (RGB).

    Needs only the checkpoint's size rule, so a caller can check all its requests before it
    loads a model.
    """
    check_generation(
        limits,
        [request.prompt],
        request.height,
        request.width,
        request.steps,
        request.guidance,
        request.num_images,
    )
    request_seeds(request.seed, request.num_images)
    if not request.images:
        return request
    [images] = load_condition_images(list(request.images), 1, limits, fit=request.fit_images)
    return dataclasses.replace(request, images=tuple(images))


# ------------------------------------------------------------------------------ prompt text


def control_strings(tokenizer) -> tuple[str, ...]:
    """The special-token strings ``tokenizer`` would read as control tokens inside a text."""
    specials = set(getattr(tokenizer, "all_special_tokens", ()))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials.update(token.content for token in decoder.values() if getattr(token, "special", False))
    return tuple(sorted(s for s in specials if len(s) > 1))


def plain_text(text: str, controls: Sequence[str]) -> str:
    """``text`` with a WORD JOINER after the first character of every occurrence (overlapping
    ones too) of every string in ``controls``, so that none of them occurs any more.

    Why none can: a control string contains no joiner, so an occurrence in the result would be an
    occurrence in ``text``, and each of those now has a joiner after its first character.
    """
    starts = set()
    for control in controls:
        at = text.find(control)
        while at >= 0:
            starts.add(at)
            at = text.find(control, at + 1)
    if not starts:
        return text
    parts, last = [], 0
    for at in sorted(starts):
        parts += [text[last : at + 1], WORD_JOINER]
        last = at + 1
    parts.append(text[last:])
    return "".join(parts)


# ------------------------------------------------------------------------------ condition images


def load_condition_images(images, prompts: int, limits: SizeLimits, fit: bool = False) -> list[list] | None:
    """Normalise ``images`` to one list of RGB PIL images per prompt, checking each one.

    One prompt may take a flat list (or a single image); several prompts take one list each,
    all of the same length (as the reference requires). Paths are opened. ``fit``: an image of a
    size the model does not take is cropped and resized to the nearest one it does (logged).
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
    return [
        [
            open_condition_image(
                item, f"images[{i}][{j}]" if prompts > 1 else f"images[{j}]", limits, fit=fit
            )
            for j, item in enumerate(group)
        ]
        for i, group in enumerate(images)
    ]


_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def open_condition_image(item, where: str, limits: SizeLimits, fit: bool = False, fit_option: str = ""):
    """One condition image (a path, a file object or a PIL image) as an upright 8-bit RGB image.

    Condition images follow the outputs' size rule (``limits``, aspect at most ``MAX_ASPECT``:1):
    the processor must not rescale them, or the token grid and the latent grid disagree. A size
    outside it is an error that names the nearest allowed size, unless ``fit``: then the image is
    resized and centre-cropped to that size (``fitted_size``) and a warning says so. It is not
    fitted to the output's size: a condition image may have any allowed size, and its own aspect
    keeps the most of it. ``fit_option``: how the caller spells ``fit`` in the error's hint.

    The size is checked from the header, before any pixel is decoded; a picture too large to
    decode safely is refused, never decoded. A path must name a regular file: a FIFO or a device
    would block or never end.
    """
    from PIL import Image, ImageOps

    if isinstance(item, (str, Path)):
        _check_regular_file(item, where)
    try:
        image = item if isinstance(item, Image.Image) else Image.open(item)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise GlmImageError(
            f"{where}: too many pixels to decode safely; allowed: at most {limits.maximum} pixels a side"
        ) from None
    except Exception as e:  # untrusted bytes: whatever the decoder raises is "not readable"
        raise GlmImageError(f"{where}: not a readable image ({_reason(e)})") from None
    width, height = _upright_size(image)
    if not width or not height:
        raise GlmImageError(f"{where}: an empty image ({width}x{height})")
    target = fitted_size(width, height, limits)
    if target != (width, height) and not fit:
        option = fit_option or "fit_images=True"
        hint = f"the nearest allowed size is {target[0]}x{target[1]}; {option} crops and resizes to it"
        try:
            limits.check(f"{where} width", width)
            limits.check(f"{where} height", height)
        except GlmImageError as e:
            raise GlmImageError(f"{e}; {hint}") from None
        raise GlmImageError(
            f"{where}: aspect ratio {width}x{height}; allowed: at most {MAX_ASPECT}:1; {hint}"
        )
    try:
        image = to_rgb(ImageOps.exif_transpose(image))  # EXIF orientation: as a viewer shows it
    except Exception as e:  # a header that reads but pixels that do not
        raise GlmImageError(f"{where}: not a readable image ({_reason(e)})") from None
    target = fitted_size(*image.size, limits)  # upright now, whatever the header said
    if target == image.size:
        return image
    log.warning(
        "%s: %dx%d is not an allowed size; resized and centre-cropped to %dx%d, the nearest allowed",
        where, *image.size, *target,
    )  # fmt: skip
    return ImageOps.fit(image, target, method=Image.Resampling.LANCZOS)


def fitted_size(width: int, height: int, limits: SizeLimits) -> tuple[int, int]:
    """The allowed size nearest to ``width`` x ``height`` keeping its aspect (to within a
    multiple): the long side cropped to ``MAX_ASPECT`` times the short one, scaled into
    ``limits.minimum``..``limits.maximum``, each side rounded to the nearest multiple. An
    allowed size is its own answer."""
    w, h = min(width, MAX_ASPECT * height), min(height, MAX_ASPECT * width)
    scale = min(1.0, limits.maximum / max(w, h))
    scale = max(scale, limits.minimum / min(w, h))

    def side(value: float) -> int:
        m = limits.multiple
        nearest = int(value / m + 0.5) * m
        lowest = -(-limits.minimum // m) * m  # the smallest multiple in range
        return min(max(nearest, lowest), limits.maximum // m * m)

    w, h = side(w * scale), side(h * scale)
    while max(w, h) > MAX_ASPECT * min(w, h):  # rounding can stretch 4:1 a little past it
        w, h = (w - limits.multiple, h) if w > h else (w, h - limits.multiple)
    return w, h


def _upright_size(image) -> tuple[int, int]:
    """(width, height) as a viewer shows it: EXIF orientations 5..8 turn the picture a quarter."""
    if getattr(image, "format", None) == "PNG" and "exif" not in image.info:
        return image.size  # its getexif() would decode every pixel to look for a late eXIf chunk
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block: exif_transpose will fail on it, or ignore it
        orientation = 1
    return image.size[::-1] if orientation in (5, 6, 7, 8) else image.size


def _check_regular_file(path: str | Path, where: str) -> None:
    """A FIFO, socket or device is refused before it is opened (opening a FIFO waits for a writer)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise GlmImageError(f"{where}: not a readable image ({_reason(e)})") from None
    except ValueError:  # a NUL byte in the path
        raise GlmImageError(f"{where}: not a readable image (the path holds a NUL byte)") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise GlmImageError(f"{where}: {kind}; allowed: an image file such as PNG, JPEG or WebP")


def _reason(error: Exception) -> str:
    """Pillow's message without the file object's repr (a memory address) it sometimes names."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not a format Pillow can read, e.g. PNG, JPEG, WebP"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    text = getattr(error, "strerror", None) or str(error)
    return text if " at 0x" not in text else type(error).__name__


def to_rgb(image):
    """8-bit RGB. 16-bit grey ("I;16", and "I" as Pillow opens 16-bit PNGs) maps 0..65535 onto
    0..255 (v * 255 / 65535, rounded); Pillow's own convert would clip it at 255, near-white."""
    import numpy as np
    from PIL import Image

    if image.mode in _SIXTEEN_BIT:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        image = Image.fromarray(grey)  # (H, W) uint8: mode "L"
    return image.convert("RGB")
