"""AR decode speed: our engine vs transformers' ``generate`` on the same weights, same run.

    python benchmarks/bench_ar.py --presets tiny,wide --out results/bench_ar.json

For each preset the two runners alternate (reference, ours, reference, ...) after a warm-up, on
the same prompt and size, with the checkpoint's sampling settings (temperature 0.9, top_p 0.75;
`--greedy` for argmax). Reported per runner: median tokens/s over the repeats (new tokens /
wall time, prefill included for both), and the weight bandwidth achieved: bytes of the decoder
weights read per token (every matrix and norm, one embedding row) / seconds per token.

`tiny` generates the whole protocol at the given size. `wide` has the released widths, so a
token reads ~2 GB on a CPU: it generates `--wide-tokens` tokens (default 16). `--max-tokens`
caps every preset. A preset may also be a checkpoint folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _report import markdown_table, median, parse_size, timed, write_report

from glm_image.bench.roofline import ar_weight_bytes_per_token
from glm_image.device import resolve_device
from glm_image.engine import ArEngine
from glm_image.hub import resolve_checkpoint

PROMPT = "A vintage poster with the title 'SUMMER SALE' in bold red letters"


def bench_preset(
    preset: str,
    height: int,
    width: int,
    repeats: int,
    greedy: bool,
    max_tokens: int | None,
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None = None,
) -> dict:
    from transformers import GlmImageForConditionalGeneration

    root = resolve_checkpoint(preset)
    ours = ArEngine.from_pretrained(root, device=device, dtype=dtype, attention_backend=backend)
    reference = (
        GlmImageForConditionalGeneration.from_pretrained(root / "vision_language_encoder", dtype=dtype)
        .to(device)
        .eval()
    )
    inputs = ours.processor_inputs(PROMPT, height, width).to(device)
    protocol = ours.generate(PROMPT, height, width, max_new_tokens=1).spec.num_tokens
    tokens = min(protocol, max_tokens) if max_tokens else protocol

    def run_reference(n: int) -> None:
        with torch.inference_mode():
            out = reference.generate(**inputs, max_new_tokens=n, do_sample=not greedy, min_new_tokens=n)
        assert out.shape[1] - inputs["input_ids"].shape[1] == n

    def run_ours(n: int) -> None:
        result = ours.generate(PROMPT, height, width, seeds=[0], greedy_decoding=greedy, max_new_tokens=n)
        assert result.tokens.shape[1] == n

    run_reference(min(tokens, 8))  # warm-up: allocator, thread pools, lazy imports
    run_ours(min(tokens, 8))
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    for _ in range(repeats):
        times["reference"].append(timed(lambda: run_reference(tokens), device))
        times["ours"].append(timed(lambda: run_ours(tokens), device))

    per_token = ar_weight_bytes_per_token(ours.model)
    result = {
        "preset": preset,
        "size": f"{width}x{height}",
        "mode": "greedy" if greedy else "sample (temperature 0.9, top_p 0.75)",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": ours.model.ops.name,
        "cuda_graphs": device.type == "cuda" and ours.cuda_graphs,
        "new_tokens": tokens,
        "weight_bytes_per_token": per_token,
        "seconds": times,
    }
    for runner, values in times.items():
        tps = tokens / median(values)
        result[f"{runner}_tokens_per_s"] = round(tps, 2)
        result[f"{runner}_weight_gb_per_s"] = round(per_token * tps / 1e9, 3)
    result["speedup"] = round(result["ours_tokens_per_s"] / result["reference_tokens_per_s"], 2)
    return result


def table(results: list[dict]) -> str:
    headers = [
        "preset",
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
            r["preset"],
            r["size"],
            r["mode"],
            r["new_tokens"],
            r["reference_tokens_per_s"],
            r["ours_tokens_per_s"],
            r["reference_weight_gb_per_s"],
            r["ours_weight_gb_per_s"],
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
    parser.add_argument("--size", default="512x512", help="WxH of the image whose tokens are generated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wide-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, help="generate at most N tokens for every preset")
    parser.add_argument("--greedy", action="store_true", help="argmax instead of the checkpoint's sampling")
    parser.add_argument("--device", help="cpu | cuda | npu (default: the detected platform)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32")
    parser.add_argument("--backend", help="our ops backend: auto | sdpa | triton | npu (default: auto)")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    width, height = parse_size(args.size)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or "float32")
    results = []
    for preset in args.presets.split(","):
        cap = args.wide_tokens if preset == "wide" else None
        if args.max_tokens:
            cap = min(cap or args.max_tokens, args.max_tokens)
        results.append(
            bench_preset(preset, height, width, args.repeats, args.greedy, cap, device, dtype, args.backend)
        )
    config = {"presets": args.presets, "size": args.size, "repeats": args.repeats, "greedy": args.greedy}
    notes = [
        "tokens/s = new tokens / wall seconds of the whole call, prefill included, median over the repeats"
    ]
    return write_report("ar_decode", results, args.out, config=config, notes=notes, table=table(results))


if __name__ == "__main__":
    main()
