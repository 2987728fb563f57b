"""W8A8 GEMMs at the DiT's widths: bf16 ``F.linear`` against every quantized way, in one run.

    python benchmarks/bench_w8a8.py --out results/bench_w8a8.json     # CUDA: the DiT's linears, 8192 rows
    python benchmarks/bench_w8a8.py --rows 8192,32768 --compile-mode max-autotune-no-cudagraphs
    python benchmarks/bench_w8a8.py --part ar --rows 1024             # the AR's linears at a prefill
    python benchmarks/bench_w8a8.py --dry-run --out /tmp/w8a8.json    # CPU, tiny shapes, seconds (tests)

Rows: a 1024x1024 image is 4096 DiT image tokens, twice for classifier-free guidance: 8192 (the
text tokens add a few dozen; 2048x2048 is 32768). Shapes (out, in) from the released config
(``glm_image/presets/glm-image``): the four quantized linears of a DiT block (``attn1.qkv``,
``attn1.to_out.0``, ``ff.net.0.proj``, ``ff.net.2``) or of an AR layer.

Cases, each on the same bf16 activations and weights, timed by ``triton.testing.do_bench``
(median, L2 flushed) and reported against bf16 ``F.linear`` of the same run (``vs_bf16`` > 1:
faster), with its error against the unquantized float32 product (``max_rel_error``, of the
output's max):

- ``bf16 F.linear``; ``int8 dequantize + F.linear`` (the path int8 took before W8A8);
- ``int8-w8a8`` (``glm_image.ops.quant``: fused per-token quantization, ``torch._int_mm``, fused
  epilogue), ``int8-w8a8 unfused`` (the same maths in torch ops: what the fusion saves) and
  ``int8 _int_mm alone`` (the GEMM on ready codes: the floor);
- ``fp8 scaled-mm`` (fused quantization + row-wise ``torch._scaled_mm``), ``fp8 scaled-mm, torch
  act quant`` (the activation quantization it replaced), ``fp8 scaled-mm fast accum``
  (``use_fast_accum=True``, torchao's default) and ``fp8 _scaled_mm alone``;
- ``act quant int8`` / ``act quant fp8``: ``quantize_rows`` alone (``gb_per_s``: bytes read and
  written / time);
- where importable: torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``
  and ``Int8DynamicActivationInt8WeightConfig()`` on an ``nn.Linear``, eager and compiled;
- unless ``--compile-mode none``: ``torch.compile`` of the W8A8 linear written in torch ops
  (activation quantization, ``_int_mm`` or ``_scaled_mm``, scaling): Inductor fuses the
  quantization into one kernel, and with ``max-autotune`` may generate a Triton GEMM with the
  scaling in its epilogue.

Summary rows (``linear`` = ``dit block`` / ``ar layer``): each case's sum over the four linears,
and ``per step``: that sum times the block count (30 DiT blocks, 40 AR layers), the GEMM time a
DiT CFG step (or a prefill) spends in the quantized linears.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import build_report, median, print_report, ratio, save_report

PRESETS = Path(__file__).resolve().parents[1] / "glm_image" / "presets"


def linears(part: str, preset: str) -> tuple[dict[str, tuple[int, int]], int]:
    """The quantized linears (out, in) of one DiT block or AR layer, and the block count."""
    from glm_image.config.checkpoint import CheckpointConfig

    config = CheckpointConfig.from_dir(PRESETS / preset)
    if part == "dit":
        d = config.dit.hidden_size
        shapes = {"qkv": (3 * d, d), "to_out": (d, d), "ff_up": (4 * d, d), "ff_down": (d, 4 * d)}
        return shapes, config.dit.num_layers
    t = config.ar.text
    qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    shapes = {
        "qkv": (qkv, t.hidden_size),
        "o": (t.hidden_size, t.num_attention_heads * t.head_dim),
        "gate_up": (2 * t.intermediate_size, t.hidden_size),
        "down": (t.hidden_size, t.intermediate_size),
    }
    return shapes, t.num_hidden_layers


def _timer(device: torch.device, repeats: int):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=max(20, 20 * repeats))

    def cpu(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return median(times) * 1e3

    return cpu


def _torch_w8a8(kind: str, weight, bias: torch.Tensor):
    """The W8A8 linear in plain torch ops (what ``torch.compile`` is given)."""
    from glm_image_kernels.act_quant import QMAX

    top, codes = QMAX[kind], torch.int8 if kind == "int8" else torch.float8_e4m3fn
    tiny = torch.finfo(torch.float32).tiny

    def run(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        scale = (xf.abs().amax(dim=1, keepdim=True) / top).clamp_min(tiny)
        v = (xf / scale).clamp(-top, top)
        if kind == "int8":
            acc = torch._int_mm(torch.round(v).to(codes), weight.data.t())
            return (acc.float() * scale * weight.scale + bias.float()).to(x.dtype)
        return torch._scaled_mm(
            v.to(codes), weight.data.t(), scale_a=scale, scale_b=weight.scale[None, :], bias=bias,
            out_dtype=torch.bfloat16,
        )  # fmt: skip

    return run


def _torchao_cases(w16: torch.Tensor, b16: torch.Tensor, compile_mode: str) -> dict:
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as e:
        print(f"torchao not importable ({e}): its cases are skipped")
        return {}
    cases = {}
    for name, make in (
        ("torchao fp8 rowwise", lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())),
        ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig),
    ):
        try:
            linear = torch.nn.Linear(w16.shape[1], w16.shape[0], device=w16.device, dtype=w16.dtype)
            with torch.no_grad():
                linear.weight.copy_(w16)
                linear.bias.copy_(b16)
            quantize_(linear, make())
        except Exception as e:  # a config this build or card cannot take: recorded, not fatal
            cases[name] = e
            continue
        cases[name] = linear
        if compile_mode != "none":
            cases[f"{name} + torch.compile"] = torch.compile(linear, mode=compile_mode)
    return cases


def _shape_rows(name: str, n: int, k: int, m: int, args, device: torch.device) -> list[dict]:
    import glm_image_kernels as gk

    from glm_image.ops.quant import TORCH_PATHS
    from glm_image.quant.formats import quantize

    paths = {p.name: p for p in TORCH_PATHS}
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(device)
    b = (torch.randn(n, generator=g) * 0.1).to(device)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w16, b16 = w.to(torch.bfloat16), b.to(torch.bfloat16)
    int8, fp8 = quantize(w, "int8"), quantize(w, "fp8")
    quantizer = gk.quantize_rows if device.type == "cuda" else gk.quantize_rows_reference
    codes8, _ = quantizer(x, "int8", 17)
    rows16 = -(-m // 16) * 16 if device.type == "cuda" else m
    codes_f8, scale_f8 = quantizer(x, "fp8", rows16)

    def scaled_mm(xq, scale, fast=False):
        return torch._scaled_mm(xq, fp8.data.t(), scale_a=scale[:, None], scale_b=fp8.scale[None, :],
                                bias=b16, out_dtype=torch.bfloat16, use_fast_accum=fast)  # fmt: skip

    def old_fp8():  # the activation quantization scaled-mm had before the fused kernel
        xf = x.float()
        s = (xf.abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(torch.finfo(torch.float32).tiny)
        return scaled_mm((xf / s).to(torch.float8_e4m3fn), s[:, 0])[:m]

    def unfused_int8():
        c, s = gk.quantize_rows_reference(x, "int8", 17)
        return gk.scale_int32_reference(torch._int_mm(c, int8.data.t())[:m], s, int8.scale, b16, x.dtype)

    cases = {
        "bf16 F.linear": lambda: F.linear(x, w16, b16),
        "int8 dequantize + F.linear": lambda: gk.quant_linear_reference(x, int8, b16),
        "int8-w8a8": lambda: paths["int8-w8a8"].run(x, int8, b16),
        "int8-w8a8 unfused": unfused_int8,
        "int8 _int_mm alone": lambda: torch._int_mm(codes8, int8.data.t()),
        "fp8 scaled-mm": lambda: paths["scaled-mm"].run(x, fp8, b16),
        "fp8 scaled-mm, torch act quant": old_fp8,
        "fp8 scaled-mm fast accum": lambda: scaled_mm(codes_f8, scale_f8, fast=True)[:m],
        "fp8 _scaled_mm alone": lambda: scaled_mm(codes_f8, scale_f8),
        "act quant int8": lambda: quantizer(x, "int8", 17),
        "act quant fp8": lambda: quantizer(x, "fp8", rows16),
    }
    if device.type == "cuda":
        cases.update(_torchao_cases(w16, b16, args.compile_mode))
        if args.compile_mode != "none":
            for kind, weight in (("int8", int8), ("fp8", fp8)):
                cases[f"{kind} w8a8 torch.compile"] = torch.compile(
                    _torch_w8a8(kind, weight, b16), mode=args.compile_mode
                )
    expected = F.linear(x.float(), w, b)
    timer = _timer(device, args.repeats)
    act_bytes = m * k * (x.element_size() + 1) + 4 * m
    results = []
    for case, fn in cases.items():
        row = {"linear": name, "shape": [n, k], "rows": m, "case": case}
        if isinstance(fn, Exception):
            results.append({**row, "error": str(fn)[:200]})
            continue
        call = (lambda f=fn: f(x)) if isinstance(fn, torch.nn.Module) or "compile" in case else fn
        try:
            with torch.inference_mode():
                out = call()
                ms = timer(call)
        except Exception as e:  # a case this build or card cannot take: recorded, not fatal
            results.append({**row, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        row["ms"] = round(ms, 4)
        if case.startswith("act quant"):
            row["gb_per_s"] = round(act_bytes / ms / 1e6, 1)
        elif not case.endswith("alone"):  # the GEMMs alone return unscaled or padded products
            err = (out.float()[:m] - expected).abs().max() / expected.abs().max()
            row["max_rel_error"] = round(float(err), 5)
            row["tflops"] = round(2 * m * n * k / ms / 1e9, 1)
        results.append(row)
    base = next(r["ms"] for r in results if r["case"] == "bf16 F.linear")
    for r in results:
        if "ms" in r:
            r["vs_bf16"] = ratio(base, r["ms"])
    return results


def _summaries(results: list[dict], part: str, blocks: int, count: int) -> list[dict]:
    """Per row count and case: the sum over one block's linears, and times the block count."""
    label = "dit block" if part == "dit" else "ar layer"
    out = []
    for m in dict.fromkeys(r["rows"] for r in results):
        sums = {}
        for case in dict.fromkeys(r["case"] for r in results):
            rows = [r for r in results if r["rows"] == m and r["case"] == case and "ms" in r]
            if len(rows) == count:
                sums[case] = sum(r["ms"] for r in rows)
        base = sums.get("bf16 F.linear")
        for case, ms in sums.items():
            row = {
                "linear": label,
                "rows": m,
                "case": case,
                "ms": round(ms, 4),
                "per_step_ms": round(ms * blocks, 3),
            }
            if base:
                row["vs_bf16"] = ratio(base, ms)
            out.append(row)
    return out


def run(args) -> dict:
    device = torch.device("cpu" if args.dry_run else args.device)
    shapes, blocks = linears(args.part, "tiny" if args.dry_run else args.preset)
    rows = [40] if args.dry_run else args.rows
    results = []
    for m in rows:
        for name, (n, k) in shapes.items():
            results += _shape_rows(name, n, k, m, args, device)
    results += _summaries(results, args.part, blocks, len(shapes))
    config = {"part": args.part, "preset": "tiny" if args.dry_run else args.preset, "rows": rows,
              "linears": shapes, "blocks": blocks, "compile_mode": args.compile_mode, "dry_run": args.dry_run}  # fmt: skip
    notes = [
        "vs_bf16: bf16 F.linear's time / the case's (> 1: faster), same run, same inputs",
        "max_rel_error: max |out - float32 unquantized product| / max |that product|",
        "per_step_ms: a block's quantized linears times the block count (attention, norms and the "
        "AdaLN modulation are not included)",
    ]
    if args.dry_run:
        notes.append("dry run: CPU, the tiny preset's widths, twins for the kernels; times mean nothing")
    return build_report(f"w8a8_{args.part}", results, config=config, notes=notes, device=device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("dit", "ar"), default="dit", help="whose linears")
    parser.add_argument("--preset", default="glm-image", help="the config the widths come from")
    parser.add_argument("--rows", default="8192", help="activation rows, comma-separated")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode for the compiled cases, or none")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, 40 rows: checks the script")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",") if r]
    if args.dry_run:
        args.repeats, args.compile_mode = 1, "none"
    report = run(args)
    if args.out:
        save_report(report, args.out)
    print_report(report)


if __name__ == "__main__":
    main()
