"""Functions the parallel tests run on every rank of a ``ProcessStage`` (``ProcessStage.run`` takes a
picklable function of the rank's engine; these are imported by name in the rank processes).

Each gathers what every rank saw, so a test can check the ranks agree, not only rank 0's answer.
"""

from __future__ import annotations

import time

import torch
from PIL import Image

SIZE = 64  # pixels: a 4x4 grid of DiT image tokens


def _everyone(x: torch.Tensor) -> torch.Tensor:
    """(ranks, ...) every rank's ``x`` (one process: (1, ...))."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return x[None]
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.stack(out)


# ---------------------------------------------------------------- AR


def ar_generate(
    engine, prompts, height=128, width=128, seed=3, logits=True, decode_step=None, sampling=None, **kwargs
):
    """(logits (steps, B, V) or None, tokens of every rank (ranks, B, steps)) of ``engine.generate``;
    ``decode_step`` and ``sampling`` (a ``SamplingParams``) replace the engine's for this call."""
    saved = engine.decode_step, engine.sampling
    engine.decode_step, engine.sampling = decode_step or saved[0], sampling or saved[1]
    try:
        result = engine.generate(prompts, height, width, seeds=seed, return_logits=logits, **kwargs)
    finally:
        engine.decode_step, engine.sampling = saved
    return (torch.stack(result.logits) if logits else None), _everyone(result.tokens)


def ar_rogue_picker(engine, prompts, seed=3):
    """``ar_generate`` (sampled, no logits) with every rank but the first picking garbage tokens,
    were it ever asked to pick."""
    from glm_image.engine import decode

    original = decode.TokenPicker.__call__
    if engine.model.tp.rank != 0:
        decode.TokenPicker.__call__ = lambda self, logits, noise, unfinished: torch.zeros(
            logits.shape[0], dtype=torch.long, device=logits.device
        )
    try:
        return ar_generate(engine, prompts, seed=seed, logits=False, greedy=False)
    finally:
        decode.TokenPicker.__call__ = original


# ---------------------------------------------------------------- DiT


def prior(images: int, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    n = (size // 16) ** 2
    return torch.randint(0, 16384, (images, n), generator=torch.Generator().manual_seed(seed))


def conditions(count: int) -> list:
    """One 64x64 condition image per prompt, with its 2x2 grid of VQ codes."""
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(10 + i)
        image = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
        out.append([(image, torch.randint(0, 16384, (4,), generator=g), (2, 2))])
    return out


def denoise_call(prompts, images: bool, guidance: float = 1.5, steps: int = 3) -> dict:
    return {
        "prior_token_ids": prior(len(prompts)),
        "prompts": list(prompts),
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "seeds": list(range(len(prompts))),
        "conditions": conditions(len(prompts)) if images else None,
    }


def dit_denoise(engine, call: dict, cache=None):
    """(every rank's final latents (ranks, B, C, h, w), forwards per image or None)."""
    from glm_image.engine.step_cache import StepCache

    step_cache = StepCache(cache) if cache is not None else None
    latents = engine.denoise(**call, dit_cache=step_cache)
    return _everyone(latents), (step_cache.forwards if step_cache is not None else None)


# ---------------------------------------------------------------- launch


def busy(engine, seconds: float) -> int:
    """Collectives for ``seconds`` (a call a killed rank leaves the others waiting in); its rank."""
    import torch.distributed as dist

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dist.all_reduce(torch.ones(1))
        time.sleep(0.01)
    return dist.get_rank()


def fail_on(engine, rank: int) -> int:
    """Raise on rank ``rank`` only, before any collective: the others answer."""
    import torch.distributed as dist

    if dist.get_rank() == rank:
        raise ValueError(f"rank {rank} fails on purpose")
    return dist.get_rank()
