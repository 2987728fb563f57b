"""How a stage runs on one loaded engine: the one function every handle ends in.

``ar_stage`` (the AR engine) answers an ``ArCall`` with ``PriorTokens``; ``dit_stage`` (the DiT
engine and its VAE) a ``DitCall`` with ``Images``. ``run_on`` is what a handle calls on its
engine, in this process or in a rank process: the stage's function of a call, or, for a
picklable function of one argument, its value on the engine (benchmarks and tests look inside
the engines so). No handle kind appears here: a handle ends in an engine.
"""

from __future__ import annotations

import time

from ..errors import check_finite
from ..progress import Progress
from ..validation import control_strings, plain_text
from .calls import ArCall, DitCall, Images, PriorTokens

__all__ = ["ar_arguments", "ar_stage", "dit_stage", "prior_tokens_of", "run_on"]


def ar_stage(ar, call: ArCall, *, progress: Progress | None = None) -> PriorTokens:
    """Prior tokens for a checked call. A prompt is text: special-token strings in it never
    reach the tokenizer as control tokens (``validation.plain_text``)."""
    start = time.perf_counter()
    prompts, kwargs = ar_arguments(ar, call)
    return prior_tokens_of(
        call, ar.generate(prompts, call.height, call.width, progress=progress, **kwargs), start
    )


def ar_arguments(ar, call: ArCall) -> tuple[list[str], dict]:
    """The prompts (plain text) and the keyword arguments of ``ArEngine.generate`` for ``call``
    (the AR scheduler's ``submit`` takes the same)."""
    controls = control_strings(ar.processor.tokenizer)
    return [plain_text(p, controls) for p in call.prompts], {
        "seeds": list(call.seeds),
        "num_images_per_prompt": call.num_images_per_prompt,
        "images": call.condition_images,
        "decoding": call.decoding,
        "jacobi_window": call.jacobi_window,
        **call.jacobi.kwargs(),
    }


def prior_tokens_of(call: ArCall, result, start: float) -> PriorTokens:
    """What the DiT stage gets of ``call``'s ``ArResult`` (``start``: when the call began)."""
    conditions = None
    if call.condition_images is not None:  # the AR's codes of each prompt's images, for the DiT cache
        per_row = result.conditions[:: call.num_images_per_prompt]
        conditions = [
            [(image, codes, grid) for image, (codes, grid) in zip(images, row, strict=True)]
            for images, row in zip(call.condition_images, per_row, strict=True)
        ]
    return PriorTokens(
        call.prompts,
        call.height,
        call.width,
        call.seeds,
        call.num_images_per_prompt,
        result.prior_tokens.cpu(),  # never None: the grid is constrained to image codes
        conditions,
        result.tokens.shape[1],
        result.stats.image_forwards,
        {"ar": time.perf_counter() - start, "ar_prefill": result.prefill_seconds},
        result.graph_captures,
    )


def dit_stage(dit, call: DitCall, *, progress: Progress | None = None) -> Images:
    """The images of ``call.prior``. NaN or Inf in the latents or the pixels is an error
    (``NonFiniteError``), never a black image."""
    from ..engine.step_cache import StepCache

    prior = call.prior
    controls = control_strings(dit.glyph.tokenizer)
    cache = StepCache(call.dit_cache) if call.dit_cache is not None else None
    start = time.perf_counter()
    latents = dit.denoise(
        prior.prior_token_ids,
        [plain_text(p, controls) for p in prior.prompts],
        prior.height,
        prior.width,
        call.steps,
        call.guidance,
        seeds=prior.seeds,
        progress=progress,
        conditions=prior.conditions,
        dit_cache=cache,
    )
    timings = {"dit": time.perf_counter() - start}
    check_finite(latents, "latents", prior.seeds)  # before the VAE: no black image from NaN
    start = time.perf_counter()
    images = dit.decode(latents)
    timings["vae"] = time.perf_counter() - start
    if cache is not None:
        forwards = tuple(cache.forwards)
    else:  # one pass per branch and step
        forwards = (float((2 if call.guidance > 1 else 1) * call.steps),) * len(images)
    return Images(images, timings, forwards)


def run_on(stage: str, engine, payload, progress: Progress | None = None):
    """``payload`` on a loaded engine of ``stage`` ("ar" or "dit"): ``ar_stage`` of an
    ``ArCall``, ``dit_stage`` of a ``DitCall`` (with the call's adapters applied), or
    ``payload(engine)`` for a function."""
    if callable(payload):
        return payload(engine)
    if payload.lora is None:
        return (ar_stage if stage == "ar" else dit_stage)(engine, payload, progress=progress)
    from ..lora import applied

    with applied(engine, stage, payload.lora):  # the call's adapters, held on first use
        return (ar_stage if stage == "ar" else dit_stage)(engine, payload, progress=progress)
