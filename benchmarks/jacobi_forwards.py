"""Jacobi decoding's AR forwards against sequential decoding's, per draft option and temperature.

The forward count is fixed by the seeds, so each case runs once (no warm-up, no timing); the
ratio is forwards per image (the prefill included) / tokens, which is sequential decoding's
count. Random weights accept almost nothing, so this measures a sharpened copy of the model
(``glm_image.synthetic.sharpen_ar``, still random weights: its numbers are not the released
model's). ``bench ar --sharpen --jacobi-options ... --jacobi-drafts ...`` gives the same counts
with timings besides; this is the cheap form for a table over many options.

    python benchmarks/jacobi_forwards.py --model tiny --size 512x512 --temperatures 0.5,0.9,1.2 \
        --windows 8 --drafts last,above,preview --renewals plain,continued,coupled,coupled+continued \
        --seeds 0,1 --out results/jacobi_forwards.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from glm_image.bench.ar import JACOBI_OPTIONS, PROMPT
from glm_image.engine import ArEngine
from glm_image.hub import resolve_checkpoint
from glm_image.sampling import SamplingParams
from glm_image.synthetic import sharpen_ar


def _list(kind):
    return lambda text: tuple(kind(x) for x in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", default="512x512", help="WIDTHxHEIGHT")
    parser.add_argument("--temperatures", type=_list(float), default=(0.5, 0.9, 1.2))
    parser.add_argument("--windows", type=_list(int), default=(8,))
    parser.add_argument("--drafts", type=_list(str), default=("last", "above", "preview"))
    parser.add_argument("--renewals", type=_list(str), default=tuple(JACOBI_OPTIONS))
    parser.add_argument("--seeds", type=_list(int), default=(0, 1))
    parser.add_argument("--no-sharpen", action="store_true", help="measure the random weights as they are")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as scratch:
        root = resolve_checkpoint(args.model)
        if not args.no_sharpen:
            root = sharpen_ar(root, Path(scratch) / "sharp")
        engine = ArEngine.from_pretrained(root)
        default = engine.sampling
        rows = []
        cases = itertools.product(args.temperatures, args.windows, args.drafts, args.renewals)
        for temperature, window, drafts, renewal in cases:
            engine.sampling = SamplingParams(temperature, default.top_p, default.top_k)
            coupled, continued = JACOBI_OPTIONS[renewal]
            out = engine.generate(
                [PROMPT] * len(args.seeds), height, width, seeds=list(args.seeds), decoding="jacobi",
                jacobi_window=window, jacobi_drafts=drafts, jacobi_coupled=coupled, jacobi_continued=continued,
            )  # fmt: skip
            stats = out.stats
            forwards = sum(stats.image_forwards) / len(stats.image_forwards)
            histogram = [sum(column) for column in zip(*stats.accepted, strict=True)]
            rows.append(
                {
                    "temperature": temperature,
                    "window": window,
                    "drafts": drafts,
                    "renewal": renewal,
                    "tokens": stats.tokens,
                    "forwards_per_image": forwards,
                    "ratio_to_sequential": forwards / stats.tokens,
                    "accepted_histogram": histogram,
                }
            )
            print(
                f"T={temperature} W={window} {drafts:8s} {renewal:18s} "
                f"{forwards:7.1f} forwards / {stats.tokens} tokens = {forwards / stats.tokens:.3f}x",
                flush=True,
            )
    report = {
        "model": f"{args.model}{'' if args.no_sharpen else ' (sharpened)'}, random weights",
        "size": args.size,
        "seeds": list(args.seeds),
        "prompt": PROMPT,
        "top_p": default.top_p,
        "results": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
