"""Speculative Jacobi decoding against sequential decoding and transformers' ``generate``.

    python benchmarks/bench_jacobi.py --presets tiny,wide --out results/bench_jacobi.json

Per model, sampling mode (greedy; the checkpoint's settings) and decoder (sequential, the
reference, Jacobi at each ``--windows`` x ``--drafts``): model forwards per image (the prefill
included: sequential and the reference make one per token), tokens per forward, the median wall
time over ``--repeats`` after a warm-up, tokens/s, and both ratios to sequential. ``sharp`` is the
tiny checkpoint made sharp (as tests/test_jacobi.py builds it), sampled at each
``--temperatures``: acceptance needs a model whose next token depends little on a rejected draft,
which random weights are not; none of these models is the released one.

tiny and sharp write ``--tokens`` tokens (0: the whole protocol at ``--size``), wide (real widths,
2 layers: a forward reads ~1 GB on a CPU) ``--wide-tokens``. ``--threads`` sets torch's thread
count for the run (on a shared CPU, 1 avoids waiting on a descheduled worker at every op).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _report import markdown_table, median, parse_size, timed, write_report

from glm_image.engine import ArEngine, jacobi
from glm_image.hub import resolve_checkpoint
from glm_image.sampling import SamplingParams

PROMPT = "A vintage poster with the title 'SUMMER SALE' in bold red letters"


def sharp_checkpoint(source: Path, out: Path, codes: int = 16, scale: float = 6.0) -> Path:
    """``source`` with its first ``codes`` lm_head rows scaled and a shared component added to
    every token embedding (the model of tests/test_jacobi.py)."""
    from safetensors.torch import load_file, save_file

    root = Path(shutil.copytree(source, out, dirs_exist_ok=True))
    folder = root / "vision_language_encoder"
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        tensors = load_file(folder / shard)
        if "lm_head.weight" in tensors:
            head = tensors["lm_head.weight"].clone()
            head[:codes] *= scale
            tensors["lm_head.weight"] = head
        key = "model.language_model.embed_tokens.weight"
        if key in tensors:
            table = tensors[key]
            shared = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
            tensors[key] = table + shared / shared.norm() * table[:16384].norm(dim=1).mean()
        save_file(tensors, folder / shard, metadata={"format": "pt"})
    return root


def bench_model(
    name: str, engine: ArEngine, args, tokens: int, greedy: bool, reference=None, extra: dict | None = None
) -> list[dict]:
    width, height = args.size
    images = args.images
    call = {"seeds": list(range(images)), "num_images_per_prompt": images, "max_new_tokens": tokens}
    runners = {"sequential": lambda: engine.generate(PROMPT, height, width, greedy=greedy, **call)}
    if reference is not None:
        inputs = engine.processor_inputs(PROMPT, height, width)

        def run_reference():
            with torch.inference_mode():
                reference.generate(
                    **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=not greedy
                )

        runners["reference"] = run_reference
    for window in args.windows:
        for drafts in args.drafts:
            runners[f"jacobi W={window} {drafts}"] = lambda w=window, d=drafts: engine.generate(
                PROMPT,
                height,
                width,
                greedy=greedy,
                decoding="jacobi",
                jacobi_window=w,
                jacobi_drafts=d,
                **call,
            )
    results = []
    for decoder, run in runners.items():
        out = run()  # warm-up, and the forward counts (fixed by the seeds)
        seconds = median([timed(run) for _ in range(args.repeats)])
        batch = 1 if decoder == "reference" else images
        forwards = tokens if out is None else sum(out.stats.image_forwards) / images
        results.append(
            {
                "model": name,
                "mode": "greedy" if greedy else "sampled",
                "decoder": decoder,
                "images": batch,
                "tokens": tokens,
                "forwards_per_image": forwards,
                "tokens_per_forward": tokens / forwards,
                "seconds": seconds,
                "tokens_per_second": batch * tokens / seconds,
                **(extra or {}),
            }
        )
    base = next(r for r in results if r["decoder"] == "sequential")
    for r in results:
        r["forwards_vs_sequential"] = r["forwards_per_image"] / base["forwards_per_image"]
        r["speed_vs_sequential"] = r["tokens_per_second"] / base["tokens_per_second"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", default="tiny,sharp,wide", help="tiny, sharp, wide or checkpoint folders"
    )
    parser.add_argument("--size", type=parse_size, default=(256, 256), help="WxH (default 256x256)")
    parser.add_argument("--tokens", type=int, default=0, help="tiny/sharp tokens; 0: the whole protocol")
    parser.add_argument("--wide-tokens", type=int, default=12)
    parser.add_argument("--images", type=int, default=1, help="images per call (a batch of seeds)")
    parser.add_argument("--windows", default="2,4,8,16")
    parser.add_argument("--drafts", default="last", help=f"comma list of {', '.join(jacobi.DRAFT_INITS)}")
    parser.add_argument("--temperatures", default="0.5,0.9,1.2", help="the sharp model's temperatures")
    parser.add_argument("--modes", default="greedy,sampled")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers' generate")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.windows = [int(w) for w in args.windows.split(",")]
    args.drafts = args.drafts.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for preset in args.presets.split(","):
            if preset == "sharp":
                root = sharp_checkpoint(resolve_checkpoint("tiny"), Path(scratch) / "sharp")
            else:
                root = resolve_checkpoint(preset)
            engine = ArEngine.from_pretrained(root)
            width, height = args.size
            protocol = engine.generate(PROMPT, height, width, greedy=True, max_new_tokens=1).spec.num_tokens
            wide = engine.config.ar.text.hidden_size >= 1024
            tokens = args.wide_tokens if wide else (args.tokens or protocol)
            reference = None
            if not args.no_reference and preset != "sharp":
                from transformers import GlmImageForConditionalGeneration

                reference = GlmImageForConditionalGeneration.from_pretrained(
                    root / "vision_language_encoder", dtype=engine.dtype
                ).eval()
            for mode in args.modes.split(","):
                greedy = mode == "greedy"
                if preset == "sharp" and not greedy:
                    default = engine.sampling
                    for temperature in map(float, args.temperatures.split(",")):
                        engine.sampling = SamplingParams(temperature, default.top_p, default.top_k)
                        extra = {"temperature": temperature, "top_p": default.top_p}
                        results += bench_model(preset, engine, args, tokens, False, None, extra)
                    engine.sampling = default
                else:
                    results += bench_model(preset, engine, args, tokens, greedy, reference)
            del engine, reference

    headers = [
        "model",
        "mode",
        "T",
        "decoder",
        "tokens",
        "fwd/image",
        "tok/fwd",
        "fwd vs seq",
        "tok/s",
        "vs seq",
    ]
    rows = [
        [
            r["model"],
            r["mode"],
            r.get("temperature"),
            r["decoder"],
            r["tokens"],
            f"{r['forwards_per_image']:.1f}",
            f"{r['tokens_per_forward']:.2f}",
            f"{r['forwards_vs_sequential']:.2f}",
            f"{r['tokens_per_second']:.1f}",
            f"{r['speed_vs_sequential']:.2f}",
        ]
        for r in results
    ]
    config = {k: v for k, v in vars(args).items() if k != "out"}
    notes = ["random weights: acceptance on the released model will differ; see the module docstring"]
    write_report("jacobi", results, args.out, config=config, notes=notes, table=markdown_table(headers, rows))


if __name__ == "__main__":
    main()
