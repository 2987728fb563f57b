"""The two stages of a generation, each a function of one engine, and what crosses between them.

``ar_stage`` (the AR engine) turns prompts into prior tokens; ``dit_stage`` (the DiT engine and
its VAE) turns prior tokens into images. Only ``PriorTokens`` passes from one to the other: token
ids, condition codes and the request's numbers, cheap to send to another process or machine. So
the stages can run in one process (``GlmImage``), on separate devices with one request's AR
beside another's DiT, or as separate deployments.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .engine.choices import DEFAULT_WINDOW
from .errors import check_finite
from .progress import Progress
from .validation import control_strings, plain_text

__all__ = ["PriorTokens", "ar_stage", "dit_stage"]


@dataclass(frozen=True)
class PriorTokens:
    """What the DiT stage needs from the AR stage."""

    prompts: tuple[str, ...]  # as the user wrote them, one per prompt
    height: int
    width: int
    seeds: tuple[int, ...]  # one per image, prompt-major
    num_images_per_prompt: int
    prior_token_ids: torch.Tensor  # (B, (H/16) * (W/16)) on the CPU
    # image-to-image: per prompt, each condition image with its VQ codes (h*w,) and grid (h, w)
    conditions: list[list[tuple[object, torch.Tensor, tuple[int, int]]]] | None = None
    ar_tokens: int = 0  # tokens the AR model wrote per image
    ar_forwards: tuple[int, ...] = ()  # AR forwards per image, the prefill included
    timings: dict[str, float] = field(default_factory=dict)  # "ar", "ar_prefill"


def ar_stage(
    ar,
    prompts: Sequence[str],
    height: int,
    width: int,
    seeds: Sequence[int],
    *,
    num_images_per_prompt: int = 1,
    condition_images: list[list] | None = None,
    decoding: str = "sequential",
    jacobi_window: int = DEFAULT_WINDOW,
    progress: Progress | None = None,
) -> PriorTokens:
    """Prior tokens for checked inputs (``GlmImage.validate``, ``validation.request_seeds``,
    ``validation.load_condition_images``). A prompt is text: special-token strings in it never
    reach the tokenizer as control tokens (``validation.plain_text``)."""
    start = time.perf_counter()
    controls = control_strings(ar.processor.tokenizer)
    result = ar.generate(
        [plain_text(p, controls) for p in prompts],
        height,
        width,
        seeds=list(seeds),
        num_images_per_prompt=num_images_per_prompt,
        progress=progress,
        images=condition_images,
        decoding=decoding,
        jacobi_window=jacobi_window,
    )
    conditions = None
    if condition_images is not None:  # the AR's codes of each prompt's images, for the DiT cache
        per_row = result.conditions[::num_images_per_prompt]
        conditions = [
            [(image, codes, grid) for image, (codes, grid) in zip(images, row, strict=True)]
            for images, row in zip(condition_images, per_row, strict=True)
        ]
    timings = {"ar": time.perf_counter() - start, "ar_prefill": result.prefill_seconds}
    return PriorTokens(
        tuple(prompts),
        height,
        width,
        tuple(seeds),
        num_images_per_prompt,
        result.prior_tokens.cpu(),  # never None: the grid is constrained to image codes
        conditions,
        result.tokens.shape[1],
        result.stats.image_forwards,
        timings,
    )


def dit_stage(
    dit,
    prior: PriorTokens,
    num_inference_steps: int,
    guidance_scale: float,
    *,
    progress: Progress | None = None,
) -> tuple[list, dict[str, float]]:
    """Images (PIL, prompt-major) and the seconds of "dit" and "vae". NaN or Inf in the latents
    or the pixels is an error (``NonFiniteError``), never a black image."""
    controls = control_strings(dit.glyph.tokenizer)
    start = time.perf_counter()
    latents = dit.denoise(
        prior.prior_token_ids,
        [plain_text(p, controls) for p in prior.prompts],
        prior.height,
        prior.width,
        num_inference_steps,
        guidance_scale,
        seeds=prior.seeds,
        progress=progress,
        conditions=prior.conditions,
    )
    timings = {"dit": time.perf_counter() - start}
    check_finite(latents, "latents", prior.seeds)  # before the VAE: no black image from NaN
    start = time.perf_counter()
    images = dit.decode(latents)
    timings["vae"] = time.perf_counter() - start
    return images, timings
