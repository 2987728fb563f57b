"""`glm-image bench dit`: seconds per CFG denoising step, our DitEngine against diffusers' transformer
on the same weights, in the same run.

One step with classifier-free guidance is what each engine does per denoising step: diffusers
runs the conditional and the unconditional transformer forward one after the other; we run one
batched forward. Both start from the same latents, prior tokens and glyph embeddings; runs
alternate after a warm-up. Reported: median seconds per CFG step and the FLOP/s achieved, from
the analytic count of both branches' multiply-adds (``roofline.dit_flops_per_step``, the count
``bench speed`` uses for the hardware floor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .report import build_report, markdown_table, median, timed
from .roofline import dit_flops_per_step
from .runtime import StageBench

__all__ = ["DitBenchOptions", "format_dit", "run_dit"]

PROMPT = "A vintage poster with the title 'SUMMER SALE' in bold red letters"


@dataclass(frozen=True)
class DitBenchOptions(StageBench):
    pass


def run_dit(options: DitBenchOptions, progress=None) -> dict[str, Any]:
    from diffusers import GlmImageTransformer2DModel

    from ..engine import DitEngine

    ours, root, device, dtype = options.load(DitEngine)
    width, height = options.size
    reference = (
        GlmImageTransformer2DModel.from_pretrained(root / "transformer", dtype=dtype).to(device).eval()
    )
    config = ours.config.dit
    g = torch.Generator().manual_seed(0)
    n = (height // 16) * (width // 16)
    prior = torch.randint(0, config.prior_vq_quantizer_codebook_size, (1, n), generator=g).to(device)
    latents = torch.randn(1, config.in_channels, height // 8, width // 8, generator=g).to(device, dtype)
    cond, uncond = (ours.glyph.encode([p]).to(dtype) for p in (PROMPT, ""))
    size = torch.tensor([[float(height), float(width)]], device=device, dtype=dtype)
    crop = torch.zeros(1, 2, device=device, dtype=dtype)
    t = torch.tensor([999.0], device=device)

    def run_reference() -> None:
        with torch.inference_mode():
            for glyph, drop in ((cond, False), (uncond, True)):
                reference(
                    hidden_states=latents,
                    encoder_hidden_states=glyph,
                    prior_token_id=prior,
                    prior_token_drop=torch.full_like(prior, drop, dtype=torch.bool),
                    timestep=t,
                    target_size=size,
                    crop_coords=crop,
                    return_dict=False,
                )

    plan = ours._plan(prior, [PROMPT], 1, height, width, guidance_scale=1.5)

    def run_ours() -> None:
        with torch.inference_mode():
            ours._velocity(plan, latents, 1000.0)

    run_reference()
    run_ours()
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    for _ in range(options.repeats):
        times["reference"].append(timed(run_reference, device))
        times["ours"].append(timed(run_ours, device))
        if progress:
            progress()

    flops = dit_flops_per_step(config, n, cond.shape[1])
    result: dict[str, Any] = {
        "model": options.model,
        "size": f"{width}x{height}",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": ours.model.ops.name,
        "image_tokens": n,
        "flops_per_cfg_step": flops,
        "seconds": times,
    }
    for runner, values in times.items():
        result[f"{runner}_seconds_per_step"] = round(median(values), 4)
        result[f"{runner}_gflop_per_s"] = round(flops / median(values) / 1e9, 2)
    result["speedup"] = round(result["reference_seconds_per_step"] / result["ours_seconds_per_step"], 2)
    config = {
        "model": options.model,
        "checkpoint": str(root),
        "size": result["size"],
        "repeats": options.repeats,
    }
    notes = [
        "seconds per step = one conditional + one unconditional transformer pass, median over the repeats"
    ]
    return build_report("dit_step", [result], config=config, notes=notes, device=device)


def format_dit(report: dict[str, Any]) -> str:
    headers = [
        "model",
        "size",
        "image tokens",
        "ref s/step",
        "ours s/step",
        "ref GFLOP/s",
        "ours GFLOP/s",
        "speedup",
    ]
    rows = [
        [
            r["model"],
            r["size"],
            r["image_tokens"],
            r["reference_seconds_per_step"],
            r["ours_seconds_per_step"],
            r["reference_gflop_per_s"],
            r["ours_gflop_per_s"],
            r["speedup"],
        ]
        for r in report["results"]
    ]
    return "\n".join([markdown_table(headers, rows), "", *report["notes"]])
