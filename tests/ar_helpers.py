"""Test-side views into the AR engine that no user calls."""

from __future__ import annotations

import torch

from glm_image.models.ar import KVCache


@torch.inference_mode()
def prompt_logits(engine, prompts, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-vocabulary logits (B, P, V) at every prompt position (left-padded), and (B, P)
    validity: the prefill as the engine runs it, every position kept."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch, _, _ = engine._plan(prompts, height, width)
    cache = KVCache(
        engine.config.ar.text, len(prompts), batch.input_ids.shape[1], engine.device, engine.dtype
    )
    return engine.model.logits(engine._prefill(batch, cache)), batch.valid
