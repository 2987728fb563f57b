"""Block offload and the memory plan: each residency's measured peak against the planner's estimate,
and the DiT's time with its blocks streamed against resident.

    python benchmarks/bench_offload.py --model wide --device cuda --size 1024x1024 --out results/offload.json
    python benchmarks/bench_offload.py --model tiny --device cpu --size 64x64 --steps 1   # a dry run

Every residency (``glm_image.residency.RESIDENCIES``, forced with ``residency=``) runs in a fresh
child process: load, one warm-up image, then one image timed with its peak measured
(``bench.memory.PeakMemory``: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS
on a CPU, where host and device are the same memory and the figure checks the script, not the
plan). ``estimate_over_measured`` is the planner's peak for that size and residency divided by the
measured one (goal on a GPU: 1.0 to 1.1). ``dit_seconds`` is the DiT stage's time of the timed
image (glyph encoder + denoising, the VAE decode apart); ``dit_vs_resident`` divides it by the resident run's (goal with the
copies overlapped: <= 1.3). Random weights: the times and peaks do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import build_report, save_report

_CHILD = """
import json, sys, time, torch
from glm_image import GlmImage
from glm_image.bench.memory import PeakMemory
from glm_image.bench.report import synchronize
from glm_image.residency import estimate_memory
model, device, dtype, residency, quantize, width, height, steps = sys.argv[1:9]
width, height, steps = int(width), int(height), int(steps)
dtype = getattr(torch, dtype)
pipe = GlmImage.from_pretrained(model, device=device, dtype=dtype, residency=residency, quantize=quantize)
pipe.generate("a red car", height, width, num_inference_steps=steps, seed=0)  # warm-up
synchronize(device)
with PeakMemory(device) as mem, torch.inference_mode():
    start = time.perf_counter()
    out = pipe.generate("a red car", height, width, num_inference_steps=steps, seed=1)
    synchronize(device)
    total = time.perf_counter() - start
plan, root, _ = pipe.memory
estimate = estimate_memory(root, plan.scheme, dtype, height=height, width=width).peak(residency)
print(json.dumps({
    "residency": residency, "quantize": str(plan.scheme), "seconds": total,
    "timings": out.timings if hasattr(out, "timings") else {},
    "measured_peak_bytes": mem.peak, "measured_increase_bytes": mem.increase, "method": mem.method,
    "estimated_peak_bytes": estimate,
    "copies": {stage: s.copies for stage, s in pipe.streams.items()},
}))
"""


def _dit_seconds(timings: dict) -> float | None:
    """The DiT's denoising (glyph encoder + steps), the part block offload streams; the VAE apart."""
    value = timings.get("dit")
    return float(value) if value is not None else None


def main(argv=None) -> int:
    from glm_image.residency import RESIDENCIES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="wide")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 elsewhere")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=4)
    # offload last: it streams the AR's layers for every token, the slowest by far on a GPU
    parser.add_argument("--residencies", default="resident,dit_offload,swap,offload")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    width, height = (int(x) for x in args.size.lower().split("x"))
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    results = []
    notes = [
        "measured: torch max_memory_allocated over one image"
        if args.device != "cpu"
        else "measured: the process's peak RSS (a CPU: host and device are one memory; a dry run)",
        "estimate: glm_image.residency.estimate_memory(...).peak(residency) at this size, batch 1",
    ]
    config = {
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "quantize": args.quantize,
        "dtype": dtype,
    }
    for residency in args.residencies.split(","):
        if residency not in RESIDENCIES:
            parser.error(f"--residencies: {residency!r}; allowed: {', '.join(RESIDENCIES)}")
    for residency in args.residencies.split(","):
        command = [sys.executable, "-c", _CHILD, args.model, args.device, dtype, residency, args.quantize]
        command += [str(width), str(height), str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            results.append({"residency": residency, "error": done.stderr.strip().splitlines()[-1:]})
            print(f"{residency}: failed: {done.stderr.strip()[-400:]}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["estimate_over_measured"] = row["estimated_peak_bytes"] / max(1, row["measured_peak_bytes"])
        row["dit_seconds"] = _dit_seconds(row["timings"])
        results.append(row)
        resident = next(
            (r for r in results if r.get("residency") == "resident" and r.get("dit_seconds")), None
        )
        if resident is not None and row.get("dit_seconds"):
            row["dit_vs_resident"] = row["dit_seconds"] / resident["dit_seconds"]
        if args.out:  # after every residency: a run stopped at its cap keeps what it measured
            save_report(
                build_report("offload", results, config=config, notes=notes, device=args.device), args.out
            )
        print(
            f"{residency:>12}: measured {row['measured_peak_bytes'] / 1e9:.2f} GB, estimated "
            f"{row['estimated_peak_bytes'] / 1e9:.2f} GB (x{row['estimate_over_measured']:.2f}), "
            f"{row['seconds']:.2f} s, DiT {row['dit_seconds'] or 0:.2f} s (x{row.get('dit_vs_resident', 1):.2f})"
        )
    failed = [r for r in results if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
