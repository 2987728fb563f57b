"""What crosses between the two stages of a generation: the calls and their answers.

The AR stage turns an ``ArCall`` into ``PriorTokens``; the DiT stage (the DiT engine and its
VAE) turns a ``DitCall`` (prior tokens and the denoising settings) into ``Images`` (``run``).
Only these values cross: token ids, condition codes and the request's numbers, cheap
to send to another process or machine. So the stages can run in one process (``GlmImage``), in
two worker processes that overlap, or as separate deployments (``glm_image.server``).

``plan_call`` turns requests that share a ``batch_key`` into one ``ArCall`` (seeds drawn here, so
a call retried elsewhere makes the same images) and ``outputs_of`` the call's images back into
one ``GenerationOutput`` per request: every executor, and ``GlmImage.run`` / ``run_batch``, use
these, so a request gets the same image wherever it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import SizeLimits
from ..engine.choices import DEFAULT_WINDOW, JacobiDrafts, StepCacheOptions
from ..request import GenerationRequest
from ..validation import load_condition_images, request_seeds

if TYPE_CHECKING:
    from ..lora import StageLora

__all__ = [
    "ArCall",
    "DitCall",
    "GenerationOutput",
    "Images",
    "PriorTokens",
    "output_of",
    "outputs_of",
    "plan_call",
]


@dataclass(frozen=True)
class GenerationOutput:
    images: list  # PIL images, one per (prompt, image) pair, prompt-major
    prior_token_ids: torch.Tensor  # (B, (H/16) * (W/16))
    seeds: tuple[int, ...]
    # seconds per stage: "ar" (of which "ar_prefill": planning, prefill and the first token),
    # "dit", "vae"; shared by every image of the call
    timings: dict[str, float] = field(default_factory=dict)
    ar_tokens: int = 0  # tokens the AR model wrote per image (preview + target grid)
    # AR model forwards per image, the prefill included (sequential: one per token; Jacobi: fewer)
    ar_forwards: tuple[int, ...] = ()
    # DiT transformer passes per image (2 per step with guidance; fewer with a step cache)
    dit_forwards: tuple[float, ...] = ()
    ar_graph_captures: int = 0  # AR decode graphs the call captured (0: replayed kept ones, or none)


@dataclass(frozen=True)
class ArCall:
    """One AR stage call, checked, its seeds drawn."""

    prompts: tuple[str, ...]  # as the user wrote them
    height: int
    width: int
    seeds: tuple[int, ...]  # one per image, prompt-major
    num_images_per_prompt: int = 1
    condition_images: list[list] | None = None  # image-to-image: one list of RGB PIL images per prompt
    decoding: str = "sequential"
    jacobi_window: int = DEFAULT_WINDOW
    jacobi: JacobiDrafts = field(
        default_factory=JacobiDrafts
    )  # where Jacobi drafts come from, how they are renewed
    lora: StageLora | None = None  # the adapters the AR applies (``glm_image.lora.stage``)


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
    ar_graph_captures: int = 0  # ``ArResult.graph_captures``


@dataclass(frozen=True)
class DitCall:
    """One DiT stage call: the prior tokens and how to denoise them."""

    prior: PriorTokens
    steps: int
    guidance: float
    dit_cache: StepCacheOptions | None = None  # DiT step caching (``engine.step_cache``); None: off
    lora: StageLora | None = None  # the adapters the DiT applies (``glm_image.lora.stage``)


@dataclass(frozen=True)
class Images:
    """What the DiT stage made."""

    images: list  # PIL images, prompt-major
    timings: dict[str, float]  # "dit", "vae"
    # DiT transformer passes per image (2 per step with guidance); with a step cache, fewer
    dit_forwards: tuple[float, ...] = ()


def plan_call(
    requests: Sequence[GenerationRequest],
    limits: SizeLimits,
    decoding: str = "sequential",
    jacobi_window: int = DEFAULT_WINDOW,
    jacobi: JacobiDrafts | None = None,
) -> ArCall:
    """The AR call of validated requests sharing one ``batch_key``: one request keeps its
    ``num_images`` per prompt and its condition images; several are one prompt per image, each
    image with its own seed (so each request gets the images it gets alone)."""
    first, jacobi = requests[0], jacobi or JacobiDrafts()
    if len(requests) == 1:
        return ArCall(
            (first.prompt,),
            first.height,
            first.width,
            request_seeds(first.seed, first.num_images),
            first.num_images,
            load_condition_images(list(first.images) or None, 1, limits),
            decoding,
            jacobi_window,
            jacobi,
        )
    prompts: list[str] = []
    seeds: list[int] = []
    for request in requests:
        prompts += [request.prompt] * request.num_images
        seeds += request_seeds(request.seed, request.num_images)
    return ArCall(
        tuple(prompts), first.height, first.width, tuple(seeds), 1, None, decoding, jacobi_window, jacobi
    )


def output_of(prior: PriorTokens, made: Images) -> GenerationOutput:
    """The whole call's output: every image, prompt-major."""
    return GenerationOutput(
        made.images,
        prior.prior_token_ids,
        prior.seeds,
        {**prior.timings, **made.timings},
        prior.ar_tokens,
        prior.ar_forwards,
        made.dit_forwards,
        prior.ar_graph_captures,
    )


def outputs_of(
    requests: Sequence[GenerationRequest], prior: PriorTokens, made: Images
) -> list[GenerationOutput]:
    """One ``GenerationOutput`` per request (a call's images in request order; the timings are
    the shared call's)."""
    whole, outputs, at = output_of(prior, made), [], 0
    for request in requests:
        part = slice(at, at + request.num_images)
        outputs.append(
            GenerationOutput(
                whole.images[part],
                whole.prior_token_ids[part],
                whole.seeds[part],
                whole.timings,
                whole.ar_tokens,
                whole.ar_forwards[part],
                whole.dit_forwards[part],
                whole.ar_graph_captures,
            )
        )
        at = part.stop
    return outputs
