"""DiT denoising speed: seconds per CFG step, our DitEngine vs diffusers, same weights, same run.

    python benchmarks/bench_dit.py --presets tiny,wide --size 512x512 --out results/bench_dit.json

One step with classifier-free guidance is what each engine does per denoising step: diffusers
runs the conditional and the unconditional transformer forward one after the other; we run one
batched forward. Both start from the same latents, prior tokens and glyph embeddings; runs
alternate after a warm-up. Reported: median seconds per CFG step and the FLOP/s achieved, from
an analytic count of the multiply-adds of both branches (``glm_image.bench.roofline.
dit_flops_per_step``, the count `glm-image bench speed` uses for the hardware floor).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from _report import markdown_table, median, parse_size, timed, write_report

from glm_image.bench.roofline import dit_flops_per_step
from glm_image.device import resolve_device
from glm_image.engine import DitEngine
from glm_image.hub import resolve_checkpoint

PROMPT = "A vintage poster with the title 'SUMMER SALE' in bold red letters"


def bench_preset(
    preset: str,
    height: int,
    width: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None = None,
) -> dict:
    from diffusers import GlmImageTransformer2DModel

    root = resolve_checkpoint(preset)
    ours = DitEngine.from_pretrained(root, device=device, dtype=dtype, attention_backend=backend)
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
    for _ in range(repeats):
        times["reference"].append(timed(run_reference, device))
        times["ours"].append(timed(run_ours, device))

    flops = dit_flops_per_step(config, n, cond.shape[1])
    result = {
        "preset": preset,
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
    return result


def table(results: list[dict]) -> str:
    headers = [
        "preset",
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
            r["preset"],
            r["size"],
            r["image_tokens"],
            r["reference_seconds_per_step"],
            r["ours_seconds_per_step"],
            r["reference_gflop_per_s"],
            r["ours_gflop_per_s"],
            r["speedup"],
        ]
        for r in results
    ]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", default="tiny,wide", help="tiny, wide or checkpoint folders, comma-separated"
    )
    parser.add_argument("--size", default="512x512", help="WxH of the generated image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", help="cpu | cuda | npu (default: the detected platform)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32")
    parser.add_argument("--backend", help="our ops backend: auto | sdpa | triton | npu (default: auto)")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    width, height = parse_size(args.size)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or "float32")
    results = [
        bench_preset(p, height, width, args.repeats, device, dtype, args.backend)
        for p in args.presets.split(",")
    ]
    config = {"presets": args.presets, "size": args.size, "repeats": args.repeats}
    notes = [
        "seconds per step = one conditional + one unconditional transformer pass, median over the repeats"
    ]
    return write_report("dit_step", results, args.out, config=config, notes=notes, table=table(results))


if __name__ == "__main__":
    main()
