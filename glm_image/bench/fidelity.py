"""How far a quantized pipeline is from the unquantized one on the same weights: the AR's logits
(teacher-forced KL and top-1 agreement), the DiT's guided velocity (relative error) and the final
image given the same prior tokens and seed (PSNR). ``bench quality --quantize`` reports it beside
the OCR scores; ``benchmarks/bench_quant.py quality`` sweeps the schemes.

Teacher forcing (``quant.compare``): both AR models read the unquantized model's own tokens, so a
flipped near-tie does not send the generations apart. The DiT gets the unquantized AR's prior
tokens and the same seed. The unquantized engines are loaded one at a time, after the quantized
ones have run, so a device holds at most one extra stage.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["fidelity"]


def fidelity(
    quantized,
    root: Path,
    prompts: Sequence[str],
    height: int,
    width: int,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """``quantized``: a ``GlmImage`` loaded with a scheme; the same checkpoint unquantized is the
    reference (teacher-forced over its whole protocol per prompt)."""
    from ..engine import ArEngine, DitEngine
    from ..quant.compare import dit_velocity, logit_metrics, relative_error, teacher_forced_logits
    from .metrics import psnr

    device, dtype = quantized.device, quantized.ar.dtype
    full_ar = ArEngine.from_pretrained(root, device=device, dtype=dtype)
    paths = []
    for prompt in prompts:
        result = full_ar.generate(prompt, height, width, seeds=[seed])
        reference = teacher_forced_logits(full_ar, prompt, height, width, result.tokens[0])
        paths.append((prompt, result, reference))
    del full_ar
    gc.collect()
    got = torch.cat([teacher_forced_logits(quantized.ar, p, height, width, r.tokens[0]) for p, r, _ in paths])
    ar = logit_metrics(torch.cat([reference for _, _, reference in paths]), got)

    full_dit = DitEngine.from_pretrained(root, device=device, dtype=quantized.dit.dtype)
    references = []
    for prompt, result, _ in paths:
        prior = result.prior_tokens if result.prior_tokens is not None else _codes(height, width, seed)
        velocity = dit_velocity(full_dit, prior, prompt, height, width, seed=seed)
        image = full_dit.decode(full_dit.denoise(prior, prompt, height, width, steps, seeds=seed))[0]
        references.append((prompt, prior, velocity, image))
    del full_dit
    gc.collect()
    errors, psnrs = [], []
    for prompt, prior, velocity, image in references:
        errors.append(
            relative_error(velocity, dit_velocity(quantized.dit, prior, prompt, height, width, seed=seed))
        )
        latents = quantized.dit.denoise(prior, prompt, height, width, steps, seeds=seed)
        psnrs.append(psnr(quantized.dit.decode(latents)[0], image))
    return {
        "prompts": len(prompts),
        "ar_steps_per_prompt": paths[0][1].tokens.shape[1],
        "ar_kl": round(ar["kl"], 6),
        "ar_top1": round(ar["top1"], 4),
        "ar_logit_relative_error": round(ar["relative_error"], 6),
        "dit_velocity_relative_error": round(max(errors), 6),
        "image_psnr_db_min": round(min(psnrs), 2),
        "image_psnr_db_mean": round(sum(psnrs) / len(psnrs), 2),
    }


def _codes(height: int, width: int, seed: int) -> torch.Tensor:
    """Random prior codes, when the AR was capped before its target grid was complete."""
    n = (height // 16) * (width // 16)
    return torch.randint(0, 16384, (1, n), generator=torch.Generator().manual_seed(seed))
