"""AR tokens/s of the continuous-batching scheduler with R rows running against one row.

    python benchmarks/bench_continuous.py --model tiny --rows 1,16 --max-tokens 64 --out results/continuous_ar.json

For each ``--rows`` R: R requests (distinct seeds) are submitted to one ``ArScheduler`` with
``max_rows`` R and run to the end; tokens/s counts every row's tokens over the wall time
(prefills included), after a warm-up. The ratio to R = 1 is the signal (absolute numbers on a
shared CPU are noise). ``--modes``: how the rows' forwards run (``engine.scheduler``: ``apart``,
one forward per row; ``invariant``, one forward, each row its solo bits; ``batched``, one
forward sharing each GEMM; ``auto``, the device's default), each mode against ``apart`` at the
same R in the same run (``vs_apart``). ``--decode-steps``: ``auto`` (a device graph per bucket
of running rows where the device has graphs) and/or ``eager``, each a run of its own.

    python benchmarks/bench_continuous.py --size 64x64 --rows 1,4,16 --modes apart,invariant --max-tokens 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import parse_size, synchronize, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: the engine's (float32 on a CPU)")
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT of every request")
    parser.add_argument("--rows", default="1,16", help="comma list of running rows, one run each")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per row (default 256)")
    parser.add_argument(
        "--modes", default="auto", help="comma list of auto, apart, invariant, batched (default auto)"
    )
    parser.add_argument(
        "--decode-steps", default="auto", help="comma list of auto, eager (the engine's decode_step)"
    )
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)

    import torch

    from glm_image.engine import ArEngine
    from glm_image.engine.scheduler import ArScheduler
    from glm_image.hub import resolve_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = ArEngine.from_pretrained(resolve_checkpoint(args.model), device=args.device, dtype=dtype)
    width, height = parse_size(args.size)

    def scheduler_for(rows: int, mode: str) -> ArScheduler:
        return ArScheduler(engine, max_rows=rows, mode=None if mode == "auto" else mode)

    def run(scheduler: ArScheduler) -> tuple[float, int, str]:
        rows = scheduler.max_rows
        tickets = [
            scheduler.submit(
                "a storefront sign", height, width, seeds=100 + i, max_new_tokens=args.max_tokens
            )
            for i in range(rows)
        ]
        start = time.perf_counter()
        scheduler.run_until_idle()
        synchronize(engine.device)
        seconds = time.perf_counter() - start
        return seconds, sum(t.wait().tokens.numel() for t in tickets), scheduler.mode

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    steps = [m.strip() for m in args.decode_steps.split(",") if m.strip()]
    run(scheduler_for(1, "apart"))  # warm-up
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for mode in modes:
            for step in steps:
                engine.decode_step = step
                scheduler = scheduler_for(rows, mode)  # one scheduler, as a server keeps one:
                run(scheduler)  # its warm-up captures its buckets' graphs, the timed run replays
                seconds, tokens, ran = run(scheduler)
                results.append(
                    {
                        "rows": rows,
                        "mode": mode,
                        "ran_as": ran,
                        "decode_step": step,
                        "seconds": round(seconds, 4),
                        "tokens": tokens,
                        "tok_s": round(tokens / seconds, 2),
                    }
                )
    for result in results:
        same = (result["mode"], result["decode_step"])
        base = next((r for r in results if r["rows"] == 1 and (r["mode"], r["decode_step"]) == same), None)
        if base is not None:
            result["vs_one_row"] = round(result["tok_s"] / base["tok_s"], 3)
        apart = next(
            (
                r
                for r in results
                if r["rows"] == result["rows"]
                and r["ran_as"] == "apart"
                and r["decode_step"] == result["decode_step"]
            ),
            None,
        )
        if apart is not None:
            result["vs_apart"] = round(result["tok_s"] / apart["tok_s"], 3)
    config = {
        "model": args.model,
        "device": args.device,
        "size": args.size,
        "max_tokens": args.max_tokens,
        "weights": "random (the tiny model)" if args.model == "tiny" else args.model,
    }
    write_report("continuous_ar", results, args.out, config=config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
