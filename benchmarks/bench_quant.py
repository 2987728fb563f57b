"""Quantized weights: speed, memory and quality against the unquantized engine, in one run.

    python benchmarks/bench_quant.py gemv                     # one 13696x4096 GEMV per path, 1 and 2 threads
    python benchmarks/bench_quant.py gemv --device cuda       # the AR's linears at 1-128 rows: decode GEMM vs dense bf16, % of HBM
    python benchmarks/bench_quant.py gemv --dry-run           # the same code at small widths in Triton's interpreter (CPU)
    python benchmarks/bench_quant.py speed --model wide       # AR decode tok/s and DiT s/step per dtype / scheme
    python benchmarks/bench_quant.py memory --model wide      # measured peaks against the planner's estimate (--device cuda)
    python benchmarks/bench_quant.py quality --model tiny     # logits KL / top-1, velocity error, image PSNR
    ... --out results/quant_<mode>.json                      # the shared JSON layout (benchmarks/README.md)

``gemv`` on a GPU (or ``--dry-run``) times ``glm_image_kernels.quant_linear``, the int8 / int4 decode
GEMM, at each launch of ``GEMM_LAUNCHES`` and each row count of ``--rows`` against dense bf16
(``F.linear`` on the dequantized bf16 weight), fp8 ``_scaled_mm`` and torch's int8 path. Its JSON
rows (linear, rows, format, path, launch) hold ``us``, ``bytes`` (weight + activations read),
``tb_per_s``, ``hbm_fraction`` (of the card's peak: ``HBM_PEAK_TBPS`` by device name, or
``--peak-tbps``) and ``max_rel_error`` against the twin in float32; rows with linear ``layer``
add up a layer's four linears, and the notes set the default launch against the issue's targets
(75% of HBM bandwidth at one row, 60% at 64) and name the fastest single launch over all rows.

``speed`` and ``memory`` run every configuration in a fresh child process, one after the other
and in rounds (``--repeats``), so each peak is that configuration's own and a machine that drifts
favours none; AR tokens/s is (tokens - 1) / (call - prefill) seconds, the best round reported with
the median. ``quality`` loads the unquantized engine and each quantized one in turn; AR logits are
teacher-forced (``glm_image.quant.compare``), the DiT gets the same prior tokens (random codes:
the checkpoints' weights are random, so the AR's tokens carry no more meaning) and seeds. fp8 runs
here through ``torch._scaled_mm`` on the CPU (the engine allows it on FP8 GPUs only; the maths
is the same). Random weights are not the released model: its quality needs its weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import build_report, median, print_report, save_report

PROMPTS = ("A vintage poster with the title 'SUMMER SALE' in bold red letters", "a red car on a quiet street")
AR_CONFIGS = (
    "float32",
    "bfloat16",
    "float16",
    "float32+int8",
    "bfloat16+int8",
    "float16+int8",
    "float32+ar=int4",
)
DIT_CONFIGS = ("float32", "bfloat16", "float32+int8", "bfloat16+int8")


def _config(text: str) -> tuple[torch.dtype, str]:
    dtype, _, scheme = text.partition("+")
    return getattr(torch, dtype), scheme or "none"


# ---------------------------------------------------------------------- children (one config each)


def _child_ar(model: str, config: str, tokens: int, size: int) -> dict:
    from glm_image.bench.memory import PeakMemory
    from glm_image.engine import ArEngine

    dtype, scheme = _config(config)
    with PeakMemory("cpu") as memory:
        start = time.perf_counter()
        engine = ArEngine.from_pretrained(model, dtype=dtype, quantize=scheme)
        load_s = time.perf_counter() - start
        engine.generate(PROMPTS[0], size, size, seeds=[0], max_new_tokens=4)  # warm-up
        start = time.perf_counter()
        result = engine.generate(PROMPTS[0], size, size, seeds=[0], max_new_tokens=tokens)
        total = time.perf_counter() - start
    decode = total - result.prefill_seconds
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    return {
        "tokens_per_s": (tokens - 1) / decode,
        "prefill_s": result.prefill_seconds,
        "load_s": load_s,
        "weight_bytes": weights,
        "peak_rss_bytes": memory.peak,
        "peak_increase_bytes": memory.increase,
    }


def _child_dit(model: str, config: str, steps: int, size: int) -> dict:
    from glm_image.bench.memory import PeakMemory
    from glm_image.engine import DitEngine

    dtype, scheme = _config(config)
    prior = torch.randint(0, 16384, (1, (size // 16) ** 2), generator=torch.Generator().manual_seed(0))
    with PeakMemory("cpu") as memory:
        engine = DitEngine.from_pretrained(model, dtype=dtype, quantize=scheme)
        engine.denoise(prior, PROMPTS[0], size, size, num_inference_steps=1, seeds=0)  # warm-up
        start = time.perf_counter()
        engine.denoise(prior, PROMPTS[0], size, size, num_inference_steps=steps, seeds=0)
        seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    return {
        "s_per_step": seconds / steps,
        "weight_bytes": weights,
        "peak_rss_bytes": memory.peak,
        "peak_increase_bytes": memory.increase,
    }


def _child_memory(model: str, scheme: str, size: int, device: str = "cpu") -> dict:
    """Each stage's measured peak beside the planner's estimate. On the CPU: the process's growth
    (Linux peak RSS) in float32 (the checkpoint is bfloat16): every weight is then a copy in the
    process's own memory, not pages of the memory-mapped file that count only once touched. On a
    GPU: ``max_memory_allocated`` in bfloat16, the dtype the engine serves in."""
    from glm_image.bench.memory import PeakMemory
    from glm_image.engine import ArEngine, DitEngine
    from glm_image.hub import resolve_checkpoint
    from glm_image.residency import estimate_memory

    root = resolve_checkpoint(model)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    estimate = estimate_memory(root, scheme, dtype, height=size, width=size)
    out = {}
    with PeakMemory(device) as m:
        ar = ArEngine.from_pretrained(root, device=device, dtype=dtype, quantize=scheme)
    out["ar_weights"] = (m.increase, estimate.weights["ar_text_decoder"])
    with PeakMemory(device) as m, torch.inference_mode():
        ar.generate(PROMPTS[0], size, size, seeds=[0], max_new_tokens=32)
    out["ar_activations"] = (m.increase, estimate.ar_activations)
    del ar
    with PeakMemory(device) as m:
        dit = DitEngine.from_pretrained(root, device=device, dtype=dtype, quantize=scheme)
    out["dit_glyph_vae_weights"] = (m.increase, estimate.dit_stage)
    prior = torch.randint(0, 16384, (1, (size // 16) ** 2), generator=torch.Generator().manual_seed(0))
    with PeakMemory(device) as m:
        latents = dit.denoise(prior, PROMPTS[0], size, size, num_inference_steps=1, seeds=0)
    out["dit_activations"] = (m.increase, estimate.dit_activations)
    with PeakMemory(device) as m:
        dit.decode(latents)
    out["vae_activations"] = (m.increase, estimate.vae_activations)
    return {
        k: {"measured_bytes": a, "estimated_bytes": b, "ratio": round(b / a, 3) if a else None}
        for k, (a, b) in out.items()
    }


def _run_child(*args: str, threads: int | None = None) -> dict:
    extra = ["--threads", str(threads)] if threads else []
    out = subprocess.run(
        [sys.executable, __file__, "_child", *extra, *args], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- modes


def run_speed(args) -> dict:
    results = []
    rounds: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for config in args.ar_configs:
            rounds.setdefault(("ar", config), []).append(
                _run_child("ar", args.model, config, str(args.tokens), str(args.size), threads=args.threads)
            )
        for config in args.dit_configs:
            rounds.setdefault(("dit", config), []).append(
                _run_child(
                    "dit", args.model, config, str(args.steps), str(args.dit_size), threads=args.threads
                )
            )
    for (stage, config), runs in rounds.items():
        key = "tokens_per_s" if stage == "ar" else "s_per_step"
        values = [r[key] for r in runs]
        best = max(values) if stage == "ar" else min(values)
        results.append(
            {
                "stage": stage,
                "config": config,
                key: round(best, 4),
                f"{key}_median": round(median(values), 4),
                f"{key}_all": [round(v, 4) for v in values],
                "weight_bytes": runs[0]["weight_bytes"],
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            }
        )
    ar = [r for r in results if r["stage"] == "ar"]
    fastest = max((r for r in ar if "+" not in r["config"]), key=lambda r: r["tokens_per_s"], default=None)
    notes = []
    if fastest:
        for r in ar:
            r["vs_fastest_unquantized"] = round(r["tokens_per_s"] / fastest["tokens_per_s"], 3)
        notes.append(f"fastest unquantized AR dtype: {fastest['config']} ({fastest['tokens_per_s']} tok/s)")
    config = {"model": args.model, "tokens": args.tokens, "size": args.size, "dit_size": args.dit_size,
              "steps": args.steps, "repeats": args.repeats, "threads": args.threads or torch.get_num_threads()}  # fmt: skip
    return build_report("quant_speed", results, config=config, notes=notes, device="cpu")


def run_memory(args) -> dict:
    results = [
        {"scheme": s, **_run_child("memory", args.model, s, str(args.size), args.device)}
        for s in args.schemes
    ]
    notes = [
        "measured: growth of the process's peak RSS over each step (Linux VmHWM), float32"
        if args.device == "cpu"
        else f"measured: torch.{args.device}.max_memory_allocated over each step, bfloat16"
    ]
    config = {"model": args.model, "size": args.size}
    return build_report("quant_memory", results, config=config, notes=notes, device=args.device)


def _load(engine_cls, root, kind: str):
    from glm_image.models.ar import ArModel
    from glm_image.models.dit import DitModel
    from glm_image.quant import linear_quantizers
    from glm_image.weights import load_model

    engine = engine_cls.from_pretrained(root)
    if kind != "none":  # fp8 too: the CPU path of the same maths (see the module docstring)
        ar = engine_cls.__name__ == "ArEngine"
        factory = (
            (lambda: ArModel(engine.config.ar.text, engine.model.ops))
            if ar
            else (lambda: DitModel(engine.config.dit, engine.model.ops))
        )
        engine.model = load_model(factory, root / ("vision_language_encoder" if ar else "transformer"),
                                  quantize=linear_quantizers(kind)).eval()  # fmt: skip
    return engine


def run_quality(args) -> dict:
    from glm_image.bench.quality import psnr
    from glm_image.engine import ArEngine, DitEngine
    from glm_image.hub import resolve_checkpoint
    from glm_image.quant.compare import dit_velocity, logit_metrics, relative_error, teacher_forced_logits

    root = resolve_checkpoint(args.model)
    size = args.size
    reference = _load(ArEngine, root, "none")
    paths = []
    for prompt in PROMPTS:
        tokens = reference.generate(prompt, size, size, seeds=[0], max_new_tokens=args.tokens).tokens[0]
        paths.append((prompt, tokens, teacher_forced_logits(reference, prompt, size, size, tokens)))
    del reference
    results = []
    for kind in ("int8", "int4", "fp8"):
        engine = _load(ArEngine, root, kind)
        got = torch.cat([teacher_forced_logits(engine, p, size, size, t) for p, t, _ in paths])
        metrics = logit_metrics(torch.cat([ref for _, _, ref in paths]), got)
        results.append({"stage": "ar", "scheme": kind, **{k: round(v, 6) for k, v in metrics.items()}})
        del engine

    prior = torch.randint(0, 16384, (1, (size // 16) ** 2), generator=torch.Generator().manual_seed(1))
    reference = _load(DitEngine, root, "none")
    velocity = dit_velocity(reference, prior, PROMPTS[0], size, size)
    image = reference.decode(
        reference.denoise(prior, PROMPTS[0], size, size, num_inference_steps=args.steps, seeds=0)
    )[0]
    del reference
    for kind in ("int8", "fp8"):
        engine = _load(DitEngine, root, kind)
        got = dit_velocity(engine, prior, PROMPTS[0], size, size)
        latents = engine.denoise(prior, PROMPTS[0], size, size, num_inference_steps=args.steps, seeds=0)
        results.append({"stage": "dit", "scheme": kind, "velocity_relative_error": round(relative_error(velocity, got), 6),
                        "image_psnr_db": round(psnr(engine.decode(latents)[0], image), 2)})  # fmt: skip
        del engine
    config = {
        "model": args.model,
        "size": size,
        "ar_tokens": args.tokens,
        "dit_steps": args.steps,
        "prompts": PROMPTS,
    }
    notes = [
        "random weights, not the released model",
        "AR: teacher-forced over the unquantized model's tokens",
    ]
    return build_report("quant_quality", results, config=config, notes=notes, device="cpu")


def run_gemv(args) -> dict:
    """One 13696x4096 GEMV (the AR's down_proj shape) through each path, 1 and 2 threads."""
    from glm_image.ops.quant import TORCH_PATHS
    from glm_image.quant.formats import quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(13696, 4096, generator=g) / 64
    int8, int4 = quantize(w, "int8"), quantize(w, "int4")
    x = torch.randn(1, 4096, generator=g)
    paths = {p.name: p for p in TORCH_PATHS}
    halves = {d: w.to(d) for d in (torch.bfloat16, torch.float16)}
    cases = {
        "float32 dense": lambda: torch.nn.functional.linear(x, w),
        "bfloat16 dense": lambda: torch.nn.functional.linear(x.bfloat16(), halves[torch.bfloat16]),
        "float16 dense": lambda: torch.nn.functional.linear(x.half(), halves[torch.float16]),
        "int8 int8pack (float32 in/out)": lambda: paths["int8pack"].run(x, int8, None),
        "int8 int8-split (float32, 1 row)": lambda: paths["int8-split"].run(x, int8, None),
        "int4 reference (dequantize + linear)": lambda: int4.dequantize().matmul(x.T),
    }
    results = []
    threads = torch.get_num_threads()
    for n in (1, threads):
        torch.set_num_threads(n)
        times = {k: [] for k in cases}
        with torch.inference_mode():
            for fn in cases.values():
                fn()
            for _ in range(args.repeats):
                for name, fn in cases.items():  # interleaved: drift favours none
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        results += [{"threads": n, "case": k, "min_ms": round(min(v) * 1e3, 3), "median_ms": round(median(v) * 1e3, 3)}
                    for k, v in times.items()]  # fmt: skip
    torch.set_num_threads(threads)
    return build_report(
        "quant_gemv", results, config={"shape": [13696, 4096], "repeats": args.repeats}, device="cpu"
    )


# The AR's quantized linears at the released sizes (out, in): q/k/v fused, o_proj, gate/up fused, down_proj.
AR_LINEARS = {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}
DRY_LINEARS = {"qkv": (96, 128), "o": (64, 128), "gate_up": (160, 128), "down": (64, 256)}  # --dry-run
GEMM_ROWS = (1, 4, 16, 64, 128)  # decode rows: a batch times its Jacobi window
GEMM_TARGETS = {1: 0.75, 64: 0.60}  # issue 24: share of HBM bandwidth the kernel should reach
# HBM peak (TB/s) by a substring of torch.cuda.get_device_name, most specific first (GH200: ask)
HBM_PEAK_TBPS = (("GH200", None), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35),
                 ("A100-SXM4-80GB", 2.039), ("A100", 1.555))  # fmt: skip
# Launches (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) timed at every row count: one launch serves
# every M (row invariance), so the one to pick is the best over all of them. The kernel's default
# (``LAUNCH``) is timed first; these probe wider N tiles (fewer re-reads of the activations at 64
# rows and more), larger M tiles (one weight read up to 64 rows) and the old GEMV's narrow tiles.
GEMM_LAUNCHES = {
    "int8": [(16, 16, 512, 8, 2), (16, 32, 512, 4, 3), (16, 64, 256, 4, 4), (32, 64, 256, 4, 3),
             (64, 64, 128, 4, 3), (64, 128, 128, 8, 3)],
    "int4": [(16, 16, 256, 4, 4), (16, 32, 512, 8, 3), (16, 64, 256, 4, 4), (32, 64, 256, 4, 3),
             (64, 64, 256, 4, 3), (64, 128, 128, 8, 3)],
}  # fmt: skip


def hbm_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The card's HBM bandwidth in TB/s and where it came from (``--peak-tbps`` wins)."""
    if override:
        return override, "--peak-tbps"
    if device.type != "cuda":
        return None, "not a GPU (give --peak-tbps)"
    name = torch.cuda.get_device_name(device)
    peak = next((tbps for key, tbps in HBM_PEAK_TBPS if key in name), None)
    return peak, f"{name} (table)" if peak else f"{name}: not in the table (give --peak-tbps)"


def _timer(device: torch.device, repeats: int):
    """fn -> milliseconds: ``triton.testing.do_bench``'s median on a GPU (L2 flushed between
    calls), the best of ``repeats`` wall-clock calls on a CPU (a dry run: it checks the code)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median")

    def wall(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    return wall


def run_gemm_gpu(args) -> dict:
    """The decode GEMM (``glm_image_kernels.quant_linear``) against dense bf16 at the AR's linears,
    for each row count in ``--rows``: time, bytes read (weight + activations), achieved bandwidth
    and its share of the card's HBM peak. ``--dry-run``: small widths, the default launch only,
    on a CPU in Triton's interpreter (checks the code and the JSON, not the speed)."""
    device = torch.device(args.device)
    if args.dry_run and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before glm_image_kernels is imported
    import glm_image_kernels as gk
    from glm_image_kernels.quant_linear import LAUNCH

    if device.type == "cpu" and not gk.interpreted():
        raise SystemExit("gemv --device cpu runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")
    linears = DRY_LINEARS if args.dry_run else AR_LINEARS
    rows = (
        [int(r) for r in args.rows.split(",")]
        if args.rows
        else ([1, 17] if args.dry_run else list(GEMM_ROWS))
    )
    launches = {k: [LAUNCH[k]] + ([] if args.dry_run else [x for x in GEMM_LAUNCHES[k] if x != LAUNCH[k]])
                for k in ("int8", "int4")}  # fmt: skip
    peak, peak_source = hbm_peak(device, args.peak_tbps)
    timer = _timer(device, 1 if args.dry_run else args.repeats)
    results = []
    for name, (n, k) in linears.items():
        results += _gemm_shape(name, n, k, rows, launches, device, timer, peak)
    results += _layer_rows(results, peak)
    notes = _gemm_notes(results, launches, rows, peak_source)
    config = {"linears": linears, "rows": rows, "launches": launches, "default_launch": LAUNCH,
              "hbm_peak_tbps": peak, "hbm_peak_source": peak_source, "targets": GEMM_TARGETS,
              "dry_run": args.dry_run}  # fmt: skip
    return build_report("quant_gemv_gpu", results, config=config, notes=notes, device=device)


def _gemm_shape(name, n, k, rows, launches, device, timer, peak) -> list[dict]:
    from glm_image_kernels import quant_linear

    from glm_image.ops.quant import TORCH_PATHS
    from glm_image.quant.formats import quantize

    scaled_mm = next((p for p in TORCH_PATHS if p.name == "scaled-mm"), None)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) / 64).to(device)
    weights = {kind: quantize(w, kind) for kind in ("int8", "int4", "fp8")}
    w16 = weights["int8"].dequantize(torch.bfloat16)  # dense bf16: the same values, so errors compare
    scale16 = weights["int8"].scale.to(torch.bfloat16)
    exact = {kind: weight.dequantize() for kind, weight in weights.items()}  # the twin's float32 weights
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
        x_bytes = x.numel() * x.element_size()
        cases = {("bf16", "dense", None): (lambda x=x: torch.nn.functional.linear(x, w16), w16.numel() * 2)}
        if scaled_mm is not None and scaled_mm.unfit(x, weights["fp8"]) is None:
            cases[("fp8", "scaled-mm", None)] = (lambda x=x: scaled_mm.run(x, weights["fp8"], None), n * k)
        try:  # torch's own int8 weight-only matmul, where this build has it for the device
            torch._weight_int8pack_mm(x, weights["int8"].data, scale16)
            cases[("int8", "torch _weight_int8pack_mm", None)] = (
                lambda x=x: torch._weight_int8pack_mm(x, weights["int8"].data, scale16),
                weights["int8"].nbytes,
            )
        except (RuntimeError, NotImplementedError) as e:
            print(f"{name}: torch._weight_int8pack_mm unavailable: {str(e).splitlines()[0]}")
        for kind in ("int8", "int4"):
            for launch in launches[kind]:
                bm, bn, bk, warps, stages = launch
                lk = {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages}
                cases[(kind, "triton", launch)] = (
                    lambda x=x, wt=weights[kind], lk=lk: quant_linear(x, wt, **lk),
                    weights[kind].nbytes,
                )
        expected = {kind: torch.nn.functional.linear(x.float(), w32) for kind, w32 in exact.items()}
        expected["bf16"] = expected["int8"]
        for (kind, path, launch), (fn, w_bytes) in cases.items():
            row = {"linear": name, "shape": [n, k], "rows": m, "format": kind, "path": path,
                   "launch": list(launch) if launch else None}  # fmt: skip
            try:
                want = expected[kind]
                error = ((fn().float() - want).abs().max() / want.abs().max()).item()
                ms = timer(fn)
            except Exception as e:  # a launch this GPU cannot take: recorded, not fatal
                out.append({**row, "error": str(e)[:200]})
                continue
            out.append({**row, **_speed(w_bytes + x_bytes, ms, peak), "max_rel_error": round(error, 5)})
    return out


def _speed(nbytes: int, ms: float, peak: float | None) -> dict:
    tbps = nbytes / ms / 1e9
    return {"us": round(ms * 1e3, 2), "bytes": nbytes, "tb_per_s": float(f"{tbps:.4g}"),
            "hbm_fraction": float(f"{tbps / peak:.4g}") if peak else None}  # fmt: skip


def _layer_rows(results: list[dict], peak: float | None) -> list[dict]:
    """One row per (rows, format, path, launch) over all the linears: a layer's linears in one
    figure (total bytes / total time), as a decode step spends it."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if "us" in r:
            key = (r["rows"], r["format"], r["path"], tuple(r["launch"] or ()))
            groups.setdefault(key, []).append(r)
    linears = len({r["linear"] for r in results})
    out = []
    for (m, kind, path, launch), rs in groups.items():
        if len(rs) == linears:
            ms = sum(r["us"] for r in rs) / 1e3
            out.append({"linear": "layer", "rows": m, "format": kind, "path": path,
                        "launch": list(launch) or None, **_speed(sum(r["bytes"] for r in rs), ms, peak)})  # fmt: skip
    return out


def _gemm_notes(results, launches, rows, peak_source) -> list[str]:
    layer = {(r["rows"], r["format"], r["path"], tuple(r["launch"] or ())): r for r in results if r["linear"] == "layer"}  # fmt: skip

    def timed(m: int, kind: str, launch) -> dict | None:
        return layer.get((m, kind, "triton", tuple(launch)))

    notes = [f"HBM peak: {peak_source}"]
    for m in rows:
        dense = layer.get((m, "bf16", "dense", ()))
        for kind in ("int8", "int4"):
            runs = [r for launch in launches[kind] if (r := timed(m, kind, launch))]
            default = timed(m, kind, launches[kind][0])
            if default is None:
                continue
            best = min(runs, key=lambda r: r["us"])
            text = f"{m} rows, {kind}: default launch {default['us']} us per layer's linears"
            if default["hbm_fraction"] is not None:
                target = f", target {GEMM_TARGETS[m]:.0%}" if m in GEMM_TARGETS else ""
                text += f" ({default['hbm_fraction']:.0%} of HBM{target})"
            if dense:
                text += f", dense bf16 {dense['us']} us"
            if best is not default:
                text += f"; fastest launch {best['launch']} {best['us']} us"
            notes.append(text)
    for kind in ("int8", "int4"):  # one launch serves every M: rank them by their time over all rows
        totals = {}
        for launch in launches[kind]:
            runs = [timed(m, kind, launch) for m in rows]
            if all(runs):
                totals[tuple(launch)] = sum(r["us"] for r in runs)
        if totals:
            best = min(totals, key=totals.get)
            default = totals.get(tuple(launches[kind][0]))
            notes.append(
                f"{kind}: fastest single launch over rows {rows}: {list(best)}, {totals[best]:.1f} us in all"
                + (f" (default {list(launches[kind][0])}: {default:.1f} us)" if default else "")
            )
    return notes


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, *rest = sys.argv[2:]
        if kind == "--threads":  # the child's own intra-op threads (a benchmark setting)
            torch.set_num_threads(int(rest[0]))
            kind, *rest = rest[1:]
        fn = {"ar": _child_ar, "dit": _child_dit, "memory": _child_memory}[kind]
        rest = [int(r) if r.isdigit() else r for r in rest]
        print(json.dumps(fn(*rest)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("gemv", "speed", "memory", "quality"))
    parser.add_argument("--model", default="wide")
    parser.add_argument("--size", type=int, default=512, help="AR / quality image side")
    parser.add_argument("--dit-size", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=48, help="AR tokens per timed call / quality step")
    parser.add_argument("--steps", type=int, default=2, help="DiT steps timed / denoised for PSNR")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="speed: torch threads in each child (default: torch's)")
    parser.add_argument("--ar-configs", default=",".join(AR_CONFIGS))
    parser.add_argument("--dit-configs", default=",".join(DIT_CONFIGS))
    parser.add_argument("--schemes", default="none;int8;ar=int4", help="memory mode: schemes, ';'-separated")
    parser.add_argument(
        "--device",
        default="cpu",
        help="memory: cpu (peak RSS) or cuda / npu (allocator peak); gemv: cuda sweeps the GPU paths",
    )
    parser.add_argument(
        "--rows", help="gemv on a GPU: activation rows, ','-separated (default 1,4,16,64,128)"
    )
    parser.add_argument(
        "--peak-tbps", type=float, help="gemv on a GPU: the card's HBM TB/s (default: by its name)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="gemv: the GPU benchmark at small widths (CPU: interpreter)"
    )
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    args.ar_configs = [c for c in args.ar_configs.split(",") if c]
    args.dit_configs = [c for c in args.dit_configs.split(",") if c]
    args.schemes = [s for s in args.schemes.split(";") if s]
    modes = {"gemv": run_gemv, "speed": run_speed, "memory": run_memory, "quality": run_quality}
    if args.mode == "gemv" and (args.device != "cpu" or args.dry_run):
        modes["gemv"] = run_gemm_gpu
    report = modes[args.mode](args)
    if args.out:
        save_report(report, args.out)
    print_report(report)


if __name__ == "__main__":
    main()
