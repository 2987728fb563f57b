"""`glm-image bench ar`: AR decode speed, our engine against transformers' ``generate`` on the
same weights, in the same run.

The two runners alternate (reference, ours, reference, ...) after a warm-up, on the same prompt
and size, with the checkpoint's sampling settings (``--greedy`` for argmax). Reported per runner:
the median tokens/s over the repeats (new tokens / wall time, prefill included for both) and the
weight bandwidth achieved: the decoder's weight bytes read per token (every matrix and norm, one
embedding row) / seconds per token. ``--max-tokens`` caps the tokens (a wide-preset token reads
~2 GB on a CPU); without it the whole protocol at the size is generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GlmImageError
from .report import build_report, markdown_table, median, timed
from .roofline import ar_weight_bytes_per_token
from .runtime import StageBench

__all__ = ["ArBenchOptions", "format_ar", "run_ar"]

PROMPT = "A vintage poster with the title 'SUMMER SALE' in bold red letters"


@dataclass(frozen=True)
class ArBenchOptions(StageBench):
    max_tokens: int | None = None
    greedy: bool = False

    def check(self) -> None:
        super().check()
        if self.max_tokens is not None and self.max_tokens < 1:
            raise GlmImageError(f"--max-tokens = {self.max_tokens}; allowed: an integer >= 1")


def run_ar(options: ArBenchOptions, progress=None) -> dict[str, Any]:
    from transformers import GlmImageForConditionalGeneration

    from ..engine import ArEngine

    ours, root, device, dtype = options.load(ArEngine)
    width, height = options.size
    reference = (
        GlmImageForConditionalGeneration.from_pretrained(root / "vision_language_encoder", dtype=dtype)
        .to(device)
        .eval()
    )
    inputs = ours.processor_inputs(PROMPT, height, width).to(device)
    protocol = ours.generate(PROMPT, height, width, max_new_tokens=1).spec.num_tokens
    tokens = min(protocol, options.max_tokens) if options.max_tokens else protocol
    greedy = options.greedy

    def run_reference(n: int) -> None:
        with torch.inference_mode():
            out = reference.generate(**inputs, max_new_tokens=n, do_sample=not greedy, min_new_tokens=n)
        assert out.shape[1] - inputs["input_ids"].shape[1] == n

    def run_ours(n: int) -> str:
        result = ours.generate(PROMPT, height, width, seeds=[0], greedy=greedy, max_new_tokens=n)
        assert result.tokens.shape[1] == n
        return result.decode_step

    run_reference(min(tokens, 8))  # warm-up: allocator, thread pools, lazy imports
    decode_step = run_ours(min(tokens, 8))
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    for _ in range(options.repeats):
        times["reference"].append(timed(lambda: run_reference(tokens), device))
        times["ours"].append(timed(lambda: run_ours(tokens), device))
        if progress:
            progress()

    per_token = ar_weight_bytes_per_token(ours.model)
    g = ours.config.generation
    result: dict[str, Any] = {
        "model": options.model,
        "size": f"{width}x{height}",
        "mode": "greedy" if greedy else f"sample (temperature {g.temperature}, top_p {g.top_p})",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": ours.model.ops.name,
        "decode_step": decode_step,
        "new_tokens": tokens,
        "weight_bytes_per_token": per_token,
        "seconds": times,
    }
    for runner, values in times.items():
        tps = tokens / median(values)
        result[f"{runner}_tokens_per_s"] = round(tps, 2)
        result[f"{runner}_weight_gb_per_s"] = round(per_token * tps / 1e9, 3)
    result["speedup"] = round(result["ours_tokens_per_s"] / result["reference_tokens_per_s"], 2)
    config = {
        "model": options.model,
        "checkpoint": str(root),
        "size": result["size"],
        "repeats": options.repeats,
        "max_tokens": options.max_tokens,
        "greedy": greedy,
    }
    notes = [
        "tokens/s = new tokens / wall seconds of the whole call, prefill included, median over the repeats"
    ]
    return build_report("ar_decode", [result], config=config, notes=notes, device=device)


def format_ar(report: dict[str, Any]) -> str:
    headers = [
        "model",
        "size",
        "mode",
        "tokens",
        "ref tok/s",
        "ours tok/s",
        "ref GB/s",
        "ours GB/s",
        "speedup",
    ]
    rows = [
        [
            r["model"],
            r["size"],
            r["mode"],
            r["new_tokens"],
            r["reference_tokens_per_s"],
            r["ours_tokens_per_s"],
            r["reference_weight_gb_per_s"],
            r["ours_weight_gb_per_s"],
            r["speedup"],
        ]
        for r in report["results"]
    ]
    return "\n".join([markdown_table(headers, rows), "", *report["notes"]])
