"""AR decode graphs kept per bucket: a server's second request at a seen shape captures nothing.

    python benchmarks/bench_graph_reuse.py --model wide --device cuda --size 1024x1024 --out results/graph_reuse.json
    python benchmarks/bench_graph_reuse.py --model tiny --device cpu --size 64x64 --out /tmp/g.json   # a dry run

The AR engine keeps each captured decode graph with its buffers, per bucket (batch, KV capacity
rounded up to 256 slots, sampling; ``glm_image.engine.graphs``), and a later call of the bucket
refills the buffers and replays. Here a ``GlmImage`` (both stages resident) takes AR stage calls
the way a server's executor sends them (``ArCall`` through the AR handle), per decoding:

1. a warm-up call of 2 images (another bucket: the process's lazy initialisation, kernels'
   first launches and the allocator's growth land here);
2. ``first``: 1 image, a new bucket: the call captures its graph;
3. ``again``: the same prompt and size, another seed: the bucket's graph is replayed;
4. ``other prompt``: a prompt of another length and another seed, the same bucket.

Each row gives the call's wall seconds (device synchronised), its AR prefill seconds, and the
graphs it captured (``PriorTokens.ar_graph_captures``; goal: 1, 0, 0). ``saved_s`` is
``first - again``: what capturing cost the first request (warm-up step, capture, the bucket's
allocations). On a CPU there is no graph API: every call decodes eagerly and captures nothing,
so a dry run checks the script, not the reuse.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import build_report, markdown_table, parse_size, save_report, synchronize

PROMPTS = (
    "A vintage poster with the title 'SUMMER SALE' in bold red letters",
    "一张写着「欢迎光临」的木质招牌，挂在一家安静的书店门口，清晨的阳光洒在街道上",
)


def _call(handle, device, prompt: str, size, seed: int, images: int, decoding: str, window: int):
    from glm_image.stages.calls import ArCall

    width, height = size
    call = ArCall((prompt,), height, width, tuple(range(seed, seed + images)), images, None, decoding, window)
    synchronize(device)
    start = time.perf_counter()
    prior = handle.run(call)
    synchronize(device)
    return time.perf_counter() - start, prior


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="wide")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 elsewhere")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--decoding", default="sequential,jacobi", help="sequential, jacobi or both")
    parser.add_argument("--jacobi-window", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    from glm_image import GlmImage
    from glm_image.engine.graphs import graph_module

    size = parse_size(args.size)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = GlmImage.from_pretrained(args.model, device=args.device, dtype=dtype, residency="resident")
    handle = pipe.handles[0]
    engine = getattr(handle, "engine", None)
    results = []
    for decoding in args.decoding.split(","):
        run = {"decoding": decoding, "window": args.jacobi_window}
        cases = [  # (name, prompt, seed, images)
            ("warm-up (2 images)", PROMPTS[0], 100, 2),
            ("first", PROMPTS[0], 0, 1),
            ("again", PROMPTS[0], 1, 1),
            ("other prompt", PROMPTS[1], 2, 1),
        ]
        rows = []
        for name, prompt, seed, images in cases:
            seconds, prior = _call(handle, args.device, prompt, size, seed, images, **run)
            rows.append(
                {
                    "decoding": decoding,
                    "call": name,
                    "images": images,
                    "ar_tokens": prior.ar_tokens,
                    "seconds": round(seconds, 4),
                    "ar_prefill_s": round(prior.timings.get("ar_prefill", 0.0), 4),
                    "graph_captures": prior.ar_graph_captures,
                }
            )
        first, again = rows[1]["seconds"], rows[2]["seconds"]
        for row in rows:
            row["saved_s"] = round(first - again, 4) if row["call"] == "again" else None
        results += rows
    config = {
        "model": args.model,
        "size": args.size,
        "dtype": str(getattr(engine, "dtype", dtype)).removeprefix("torch."),
        "decode_step": getattr(engine, "decode_step", None),
        "graph_api": graph_module(torch.device(args.device)) is not None,
        "graph_buckets": getattr(getattr(engine, "graphs", None), "limit", None),
        "engine_graph_captures": getattr(engine, "graph_captures", None),
    }
    notes = [
        "graph_captures per AR call: 1 at a bucket's first call, 0 when it replays the bucket's graph",
        "saved_s = first - again: the capture's cost to a new shape's first request",
    ]
    report = build_report("ar_graph_reuse", results, config=config, notes=notes, device=args.device)
    headers = ["decoding", "call", "images", "tokens", "seconds", "prefill s", "captures", "saved s"]
    keys = ["decoding", "call", "images", "ar_tokens", "seconds", "ar_prefill_s", "graph_captures", "saved_s"]
    print(markdown_table(headers, [[r[k] for k in keys] for r in results]))
    if args.out:
        save_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
