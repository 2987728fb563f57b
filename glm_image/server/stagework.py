"""What one stage does for the server, wherever it runs: a thread here, a worker process, a Ray
replica. Only these values cross between the server and a stage: ``ArCall`` (prompts, size,
seeds, condition images) in, ``PriorTokens`` (token ids, condition codes) between the stages,
PIL images and timings out.

``plan_ar_call`` and ``outputs_of`` turn the server's requests into one stage call and the
call's images back into one ``GenerationOutput`` per request, the way ``GlmImage.run`` (one
request) and ``GlmImage.run_batch`` (several same-size requests) do, so a request gets the same
image from every executor. The seeds are drawn here, in the server, before the AR runs: a call
that is retried elsewhere draws the same images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config.checkpoint import SizeLimits
from ..engine.choices import DEFAULT_WINDOW
from ..request import GenerationRequest
from ..validation import load_condition_images, request_seeds

__all__ = [
    "Abandoned",
    "ArCall",
    "StageSpec",
    "load_stage",
    "outputs_of",
    "plan_ar_call",
    "run_stage",
]

STAGES = ("ar", "dit")


class Abandoned(Exception):
    """Raised inside a running stage call whose every request was abandoned, to stop it early."""


@dataclass(frozen=True)
class ArCall:
    """One AR stage call: the arguments of ``stages.ar_stage`` (checked, seeds drawn)."""

    prompts: tuple[str, ...]
    height: int
    width: int
    seeds: tuple[int, ...]  # one per image, prompt-major
    num_images_per_prompt: int
    condition_images: list[list] | None  # image-to-image: one list of RGB PIL images per prompt
    decoding: str
    jacobi_window: int


@dataclass(frozen=True)
class StageSpec:
    """What a stage worker loads: one engine of ``model`` on ``device`` (the options of
    ``GlmImage.from_pretrained``, for that stage alone)."""

    stage: str  # "ar" or "dit"
    model: str
    device: str | None = None  # None: the detected platform
    dtype: str | None = None  # a torch dtype name; None: the device's default
    attention_backend: str | None = None


def plan_ar_call(
    requests: Sequence[GenerationRequest],
    limits: SizeLimits,
    decoding: str = "sequential",
    jacobi_window: int = DEFAULT_WINDOW,
) -> ArCall:
    """The AR call of validated requests sharing one ``batch_key``: one request keeps its
    ``num_images`` per prompt and its condition images; several are one prompt per image."""
    first = requests[0]
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
        )
    prompts: list[str] = []
    seeds: list[int] = []
    for request in requests:
        prompts += [request.prompt] * request.num_images
        seeds += request_seeds(request.seed, request.num_images)
    return ArCall(tuple(prompts), first.height, first.width, tuple(seeds), 1, None, decoding, jacobi_window)


def outputs_of(requests: Sequence[GenerationRequest], prior, images: list, dit_timings: dict) -> list:
    """One ``GenerationOutput`` per request from a call's ``PriorTokens`` and images (the
    timings are the shared call's, as ``GlmImage.run_batch`` gives them)."""
    from ..pipeline import GenerationOutput

    timings = {**prior.timings, **dit_timings}
    outputs, at = [], 0
    for request in requests:
        n = request.num_images
        outputs.append(
            GenerationOutput(
                images[at : at + n],
                prior.prior_token_ids[at : at + n],
                prior.seeds[at : at + n],
                timings,
                prior.ar_tokens,
                prior.ar_forwards[at : at + n],
            )
        )
        at += n
    return outputs


def load_stage(spec: StageSpec, device: str | None = None):
    """The engine of ``spec`` (``ArEngine`` or ``DitEngine``), chosen as ``GlmImage.from_pretrained``
    chooses for both stages; ``device`` overrides ``spec.device`` (a Ray replica's own GPU)."""
    from ..device import default_dtype, resolve_device
    from ..engine import ArEngine, DitEngine
    from ..hub import resolve_checkpoint
    from ..ops import select_ops
    from ..options import torch_dtype

    where = resolve_device(device or spec.device)
    dtype = torch_dtype(spec.dtype) or default_dtype(where)
    ops = select_ops(spec.attention_backend, where)
    engine = ArEngine if spec.stage == "ar" else DitEngine
    return engine.from_pretrained(
        resolve_checkpoint(spec.model), device=where, dtype=dtype, attention_backend=ops
    )


def run_stage(stage: str, engine, payload, progress: Callable[[str, int, int], None] | None = None):
    """One stage call on a loaded engine. ``ar``: ``ArCall`` -> ``PriorTokens``; ``dit``:
    ``(PriorTokens, steps, guidance)`` -> ``(images, {"dit", "vae"} seconds)``."""
    from ..stages import ar_stage, dit_stage

    if stage == "ar":
        call: ArCall = payload
        return ar_stage(
            engine,
            call.prompts,
            call.height,
            call.width,
            call.seeds,
            num_images_per_prompt=call.num_images_per_prompt,
            condition_images=call.condition_images,
            decoding=call.decoding,
            jacobi_window=call.jacobi_window,
            progress=progress,
        )
    prior, steps, guidance = payload
    return dit_stage(engine, prior, steps, guidance, progress=progress)
