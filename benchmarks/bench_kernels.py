"""Kernel benchmark: each Triton kernel against its torch twin at the released shapes, and torch's
SDPA backends on the AR prefill and DiT attention shapes.

    python benchmarks/bench_kernels.py --out results/bench_kernels.json     # CUDA, all shapes
    python benchmarks/bench_kernels.py --quick                              # CUDA, one shape per kernel
    python benchmarks/bench_kernels.py --interpret                          # CPU smoke run, tiny shapes

On CUDA each time is ``triton.testing.do_bench``'s median (milliseconds, inputs resident, the
L2 cache flushed between runs). Each row also checks the kernel against its twin on the same
inputs (``max|diff|``) so a fast wrong kernel cannot hide. ``GB/s`` is the bytes a kernel must
move (read once, written once) over its time: the figure to hold against the HBM bandwidth
(about 3.3 TB/s on an H100 SXM) for these memory-bound kernels. Attention rows give TFLOP/s.

The SDPA rows time each backend (flash, efficient, cuDNN, math) under ``sdpa_kernel`` against
torch's default dispatch ("twin"); a backend that cannot take the inputs is listed as such. The
run ends with, per mask kind, any backend at least 10% faster than the default: a measurement
to report. The engine keeps torch's own dispatch; nothing reads these numbers back.

Without a GPU the script refuses: interpreter timings mean nothing. ``--interpret`` runs tiny
shapes through Triton's interpreter on CPU tensors as a smoke test of this script itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import build_report, save_report

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Released shapes (configs/glm-image): AR hidden 4096, 32 query / 2 KV heads x 128, M-RoPE on 64
# channels; DiT hidden 4096, 32 heads x 128; 1024x1024 gives 4096 image tokens, ~100 glyph tokens.
AR = {"hidden": 4096, "heads": 32, "kv": 2, "head_dim": 128, "rot": 64}
DIT = {"hidden": 4096, "heads": 32, "head_dim": 128, "image": 4096, "text": 100}
TINY_AR = {"hidden": 128, "heads": 4, "kv": 2, "head_dim": 32, "rot": 16}
TINY_DIT = {"hidden": 64, "heads": 2, "head_dim": 32, "image": 16, "text": 5}


@dataclass
class Row:
    kernel: str
    shape: str
    dtype: str
    ours_ms: float | None
    twin_ms: float | None
    bytes: int | None = None
    flops: float | None = None
    max_diff: tuple[float, float] | None = None  # max |ours - twin|, max |twin|
    note: str = ""
    eager_us: tuple[float, float] | None = None  # (ours, twin) wall microseconds per call, eager

    def as_dict(self) -> dict:
        speedup = self.twin_ms / self.ours_ms if self.ours_ms and self.twin_ms else None

        def rate(n, ms, unit):
            return round(n / (ms * 1e-3) / unit, 1) if n and ms else None

        return {
            "kernel": self.kernel,
            "shape": self.shape,
            "dtype": self.dtype,
            "ours_ms": self.ours_ms,
            "twin_ms": self.twin_ms,
            "speedup": round(speedup, 2) if speedup else None,
            "bytes": self.bytes,
            "ours_gb_per_s": rate(self.bytes, self.ours_ms, 1e9),
            "twin_gb_per_s": rate(self.bytes, self.twin_ms, 1e9),
            "ours_tflop_per_s": rate(self.flops, self.ours_ms, 1e12),
            "max_abs_diff": self.max_diff[0] if self.max_diff else None,
            "max_rel_diff": self.max_diff[0] / max(self.max_diff[1], 1e-30) if self.max_diff else None,
            "ours_eager_us": self.eager_us[0] if self.eager_us else None,
            "twin_eager_us": self.eager_us[1] if self.eager_us else None,
            "note": self.note,
        }


class Bench:
    """Times callables: do_bench's median on CUDA; elsewhere (Triton's interpreter, a dry run
    whose times mean nothing) the wall time of one call, so a dry run checks the script quickly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return round(float(do_bench(fn, warmup=25, rep=100, return_mode="median")), 4)
        start = time.perf_counter()
        fn()
        return round((time.perf_counter() - start) * 1e3, 4)

    def eager(self, fn: Callable[[], object], calls: int = 100) -> float:
        """Wall microseconds per call in a loop without synchronising: what an eager (not graph
        captured) decode loop pays, host launch cost included; the GPU time when that is larger."""
        if self.device.type != "cuda":
            return round(self(fn) * 1e3, 1)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return round((time.perf_counter() - start) / calls * 1e6, 1)


def _diff(a, b) -> tuple[float, float]:
    """max |ours - twin| and max |twin| (over every output)."""
    if isinstance(a, tuple):
        pairs = [_diff(x, y) for x, y in zip(a, b, strict=True)]
        return max(p[0] for p in pairs), max(p[1] for p in pairs)
    return float((a.float() - b.float()).abs().max()), float(b.float().abs().max())


def _launch_note(plan: dict, tune: dict) -> str:
    native = "native" if plan["native_dot"] else "fp32 ops"
    chosen = f"split {plan['split_size']}x{plan['splits']} tile {plan['block_n']} {native}"
    return chosen + ("" if tune else " (default)")


def _randn(shape, dtype, device, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, device=device) * scale + shift).to(dtype)


# ---------------------------------------------------------------------- kernels vs twins


def kernel_rows(gk, bench: Bench, dtype: torch.dtype, ar: dict, dit: dict, plan: dict) -> list[Row]:
    dev, name, size = bench.device, str(dtype).removeprefix("torch."), torch.finfo(dtype).bits // 8
    rows: list[Row] = []

    def add(kernel, shape, ours, twin, nbytes, check=None, note=""):
        diff = _diff(*check()) if check else _diff(ours(), twin())  # (max |diff|, max |twin|)
        eager = (bench.eager(ours), bench.eager(twin))
        rows.append(Row(kernel, shape, name, bench(ours), bench(twin), nbytes, None, diff, note, eager))

    h, kv, d = ar["heads"], ar["kv"], ar["head_dim"]
    for b, capacity, length, mode, tune in plan["decode"]:
        if tune.get("native_dot") and size != 2:
            continue  # the 16-bit product path
        q = _randn((b, 1, h + 2 * kv, d), dtype, dev)[:, :, :h].transpose(1, 2)  # strided, as in the model
        keys, values = _randn((b, kv, capacity, d), dtype, dev), _randn((b, kv, capacity, d), dtype, dev)
        visible = torch.zeros(b, capacity, dtype=torch.bool, device=dev)
        visible[:, :length] = True
        visible[1:, :7] = False  # left padding on the other rows
        bound = torch.tensor(length, dtype=torch.int32, device=dev) if mode == "tensor" else length
        moved = 2 * b * kv * length * d * size + b * length + 2 * b * h * d * size
        add(
            "decode_attention",
            f"B{b} H{h}/KV{kv} C{capacity} L{length} len={mode}",
            lambda q=q, k=keys, v=values, m=visible, n=bound, t=tune: gk.decode_attention(
                q, k, v, m, scale=d**-0.5, length=n, **t
            ),
            lambda q=q, k=keys, v=values, m=visible, n=length: gk.decode_attention_reference(
                q, k, v, m, scale=d**-0.5, length=n
            ),
            moved,
            note=_launch_note(gk.decode_attention_plan(q, keys, values, bound, **tune), tune),
        )

    for b, t in plan["rotary"]:
        qkv = _randn((b, t, h + 2 * kv, d), dtype, dev)
        angles = torch.rand(b, t, ar["rot"] // 2, device=dev) * 100
        cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
        sin = torch.cat([-angles.sin(), angles.sin()], -1).to(dtype)
        heads = qkv[:, :, : h + kv]
        moved = 2 * b * t * (h + kv) * ar["rot"] * size + 2 * b * t * ar["rot"] * size

        def check(qkv=qkv, cos=cos, sin=sin):
            a, e = qkv.clone(), qkv.clone()
            gk.rotary_(a[:, :, : h + kv], cos, sin)
            gk.rotary_reference_(e[:, :, : h + kv], cos, sin)
            return a, e

        add(
            "rotary_ (M-RoPE)",
            f"B{b} T{t} heads{h + kv}x{d} rot{ar['rot']}",
            lambda x=heads, c=cos, s=sin: gk.rotary_(x, c, s),
            lambda x=heads, c=cos, s=sin: gk.rotary_reference_(x, c, s),
            moved,
            check,
        )

    hidden = ar["hidden"]
    for b, t in plan["norm"]:
        x, r = _randn((b, t, hidden), dtype, dev, 2.0), _randn((b, t, hidden), dtype, dev, 4.0)
        w, pw = _randn((hidden,), dtype, dev, 0.2, 1.0), _randn((hidden,), dtype, dev, 0.2, 1.0)
        n = b * t * hidden * size
        add(
            "rms_norm",
            f"B{b} T{t} dim{hidden}",
            lambda x=x, w=w: gk.rms_norm(x, w, 1e-5),
            lambda x=x, w=w: gk.rms_norm_reference(x, w, 1e-5),
            2 * n,
        )
        add(
            "add_rms_norm (sandwich)",
            f"B{b} T{t} dim{hidden}",
            lambda x=x, r=r, w=w, pw=pw: gk.add_rms_norm(x, r, w, 1e-5, pre_weight=pw),
            lambda x=x, r=r, w=w, pw=pw: gk.add_rms_norm_reference(x, r, w, 1e-5, pre_weight=pw),
            4 * n,
        )

    dim, dh, heads = dit["hidden"], dit["head_dim"], dit["heads"]
    for b, n_tok in plan["adaln"]:
        x = _randn((b, n_tok, dim), dtype, dev, 2.0)
        modulation = _randn((b, 12 * dim), dtype, dev, 0.3)
        scale, shift = (m.unsqueeze(1) for m in modulation.chunk(12, dim=1)[:2])
        add(
            "layer_norm_modulate",
            f"B{b} N{n_tok} dim{dim}",
            lambda x=x, s=scale, t=shift: gk.layer_norm_modulate(x, s, t, 1e-5),
            lambda x=x, s=scale, t=shift: gk.layer_norm_modulate_reference(x, s, t, 1e-5),
            2 * b * n_tok * dim * size + 2 * b * dim * size,
        )

    for b, image, text in plan["qk"]:
        s = image + text
        qkv = _randn((b, s, 3, heads, dh), dtype, dev, 2.0)
        q, k, _ = qkv.unbind(2)
        angles = (torch.rand(image, dh // 2, device=dev) * 60).repeat(1, 2)
        cos, sin = angles.cos(), angles.sin()
        add(
            "qk_norm_rope",
            f"B{b} S{text}+{image} heads{heads}x{dh}",
            lambda q=q, k=k, c=cos, n=sin, t=text: gk.qk_norm_rope(q, k, c, n, t, 1e-5),
            lambda q=q, k=k, c=cos, n=sin, t=text: gk.qk_norm_rope_reference(q, k, c, n, t, 1e-5),
            4 * b * s * heads * dh * size + 2 * image * dh * 4,
        )
    return rows


# ---------------------------------------------------------------------- SDPA backends


def _backends():
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }


def sdpa_rows(bench: Bench, dtype: torch.dtype, ar: dict, dit: dict, plan: dict) -> tuple[list[Row], dict]:
    """Every SDPA backend on each attention shape; returns rows and {mask kind: (the fastest
    backend, its speedup over torch's default dispatch)} for kinds where one is >= 10% faster."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    dev, name = bench.device, str(dtype).removeprefix("torch.")
    rows: list[Row] = []
    best: dict[str, list[tuple[float, str]]] = {}
    cases = []
    h, kv, d = ar["heads"], ar["kv"], ar["head_dim"]
    for b, t in plan["prefill"]:
        q, k, v = (_randn((b, n, t, d), dtype, dev) for n in (h, kv, kv))
        valid = torch.ones(b, t, dtype=torch.bool, device=dev)
        for row in range(1, b):
            valid[row, : 37 * row] = False  # left padding, as in a batch of prompts
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        mask = ((causal & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=dev))[:, None]
        flops = 4 * b * h * t * t * d / 2  # causal: half the products count
        cases.append(("bool", f"AR prefill B{b} T{t} H{h}/KV{kv}", q, k, v, mask, flops))
    hd, dd = dit["heads"], dit["head_dim"]
    for b, image, text in plan["joint"]:
        s = image + text
        q, k, v = (_randn((b, hd, s, dd), dtype, dev) for _ in range(3))
        flops = 4 * b * hd * s * s * dd
        cases.append(("none", f"DiT joint B{b} S{text}+{image} H{hd}", q, k, v, None, flops))
        hide = torch.zeros(b, s, dtype=dtype, device=dev)
        hide[1:, : text // 2] = float("-inf")  # the shorter prompt's glyph padding (text_keep)
        cases.append(
            ("bias", f"DiT joint B{b} S{text}+{image} H{hd} +bias", q, k, v, hide[:, None, None], flops)
        )

    for kind, label, q, k, v, mask, flops in cases:
        gqa = q.shape[1] != k.shape[1]

        def run(q=q, k=k, v=v, mask=mask, gqa=gqa):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.088, enable_gqa=gqa)

        default_ms = bench(run)
        expected = run()
        for backend, enum in _backends().items():
            try:
                with sdpa_kernel([enum]), warnings.catch_warnings(record=True) as told:
                    warnings.simplefilter("always")
                    out = run()
            except RuntimeError as e:
                why = [str(w.message) for w in told] or [str(e)]  # torch warns each backend's reason
                rows.append(Row(f"sdpa[{backend}]", label, name, None, default_ms, note=_unsupported(why)))
                continue

            def timed(enum=enum, run=run):
                with sdpa_kernel([enum]):
                    run()

            ms = bench(timed)
            rows.append(
                Row(f"sdpa[{backend}]", label, name, ms, default_ms, None, flops, _diff(out, expected))
            )
            best.setdefault(kind, []).append((ms / default_ms, backend))
    faster = {}
    for kind, ratios in best.items():
        ratio, backend = min(ratios)
        if ratio < 1 / 1.1:
            faster[kind] = (_backends()[backend].name, round(1 / ratio, 2))
    return rows, faster


def _unsupported(messages: list[str]) -> str:
    text = " ".join(m.strip().splitlines()[0] for m in messages if m.strip())
    return "unsupported: " + (text[:100] or "no reason given")


# ---------------------------------------------------------------------- report


def _table(rows: list[dict]) -> str:
    head = (
        "kernel",
        "shape",
        "dtype",
        "ours ms",
        "twin ms",
        "speedup",
        "GB/s",
        "TFLOP/s",
        "eager us",
        "max|diff|",
    )
    cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        (
            r["kernel"],
            r["shape"],
            r["dtype"],
            cell(r["ours_ms"], ".4f"),
            cell(r["twin_ms"], ".4f"),
            cell(r["speedup"], ".2f"),
            cell(r["ours_gb_per_s"], ".0f"),
            cell(r["ours_tflop_per_s"], ".0f"),
            "-" if r["ours_eager_us"] is None else f"{r['ours_eager_us']:.0f}/{r['twin_eager_us']:.0f}",
            cell(r["max_abs_diff"], ".2e") + (f"  {r['note']}" if r["note"] else ""),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in lines)])


def _summary(results: list[dict], device: torch.device, faster: dict, sdpa: bool) -> str:
    """A few lines for the end of a log: per kernel, the default launches' speedup range and
    best bandwidth, the worst difference to the twin; the fastest decode launch; the fastest SDPA
    backend per mask kind."""
    lines = ["summary (default launches; speedup = twin ms / ours ms):"]
    kernels = [
        r
        for r in results
        if not r["kernel"].startswith("sdpa")
        and (r["kernel"] != "decode_attention" or "(default)" in r["note"])
    ]
    for name in dict.fromkeys(r["kernel"] for r in kernels):
        rs = [r for r in kernels if r["kernel"] == name]
        speed = [r["speedup"] for r in rs if r["speedup"]]
        rate = max((r["ours_gb_per_s"] or 0 for r in rs), default=0)
        worst = max(r["max_rel_diff"] for r in rs)
        lines.append(
            f"  {name:<24} {min(speed, default=0):6.2f}x .. {max(speed, default=0):6.2f}x  "
            f"up to {rate:5.0f} GB/s  max|diff|/max|twin| {worst:.1e}"
        )
    decode = [r for r in results if r["kernel"] == "decode_attention" and r["ours_ms"]]
    for shape in dict.fromkeys(r["shape"] for r in decode):
        launches = [r for r in decode if r["shape"] == shape]
        if len(launches) > 1:  # a swept shape: the fastest launch against the default one
            best = min(launches, key=lambda r: r["ours_ms"])
            default = next((r for r in launches if "(default)" in r["note"]), best)
            lines.append(
                f"  decode {shape}: fastest {best['note']} {best['ours_ms']:.4f} ms, "
                f"default {default['ours_ms']:.4f} ms"
            )
    if device.type == "cpu":
        lines.append("  (interpreter run: the timings mean nothing; max|diff| checks the kernels)")
    elif sdpa:
        found = ", ".join(f"{kind} mask: {name} {x}x" for kind, (name, x) in faster.items())
        lines.append(
            f"  SDPA backends faster than torch's default dispatch: {found}"
            if found
            else "  SDPA: torch's default dispatch is fastest"
        )
    return "\n".join(lines)


def plans(quick: bool, interpret: bool) -> dict:
    if interpret:
        return {
            "decode": [
                (2, 80, 61, "int", {}),
                (2, 80, 61, "tensor", {}),
                (2, 80, 61, "int", {"split_size": 32}),
            ],
            "rotary": [(2, 3)],
            "norm": [(2, 3)],
            "adaln": [(2, 21)],
            "qk": [(2, 16, 5)],
            "prefill": [],
            "joint": [],
        }
    if quick:
        return {
            "decode": [(1, 4608, 4608, "int", {})],
            "rotary": [(1, 1)],
            "norm": [(4, 1)],
            "adaln": [(2, 4096)],
            "qk": [(2, 4096, 100)],
            "prefill": [(1, 1024)],
            "joint": [(2, 4096, 100)],
        }
    return {
        # capacity = bound (the end of a generation), then the graph mode early in a generation,
        # then a sweep of the launch (chunk length, tile, product path) to tune the defaults
        "decode": [(b, c, c, "int", {}) for b in (1, 4) for c in (1536, 3072, 4608)]
        + [(b, 4608, 1536, "tensor", {}) for b in (1, 4)]
        + [
            (b, 4608, 4608, "int", {"split_size": split, "block_n": tile, "native_dot": native})
            for b in (1, 4)
            for native in (True, False)
            for tile in (32, 64)
            for split in (64, 128, 256, 512)
            if split >= tile
        ],
        "rotary": [(1, 1), (4, 1), (1, 1024)],
        "norm": [(1, 1), (4, 1), (1, 1024)],
        "adaln": [(2, 4096), (2, 100)],
        "qk": [(2, 4096, 100), (1, 4096, 100)],
        "prefill": [(1, 1024), (4, 512)],
        "joint": [(2, 4096, 100), (1, 4096, 100)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="one shape per kernel")
    parser.add_argument("--no-sdpa", action="store_true", help="skip the SDPA backend comparison")
    parser.add_argument("--interpret", action="store_true", help="CPU smoke run in Triton's interpreter")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before the import
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print(
            "bench_kernels times CUDA kernels and there is no GPU here; interpreter timings would mean "
            "nothing. Use --interpret for a smoke run of tiny shapes on the CPU.",
            file=sys.stderr,
        )
        return 2
    try:
        import glm_image_kernels as gk
        import triton  # noqa: F401
    except ImportError as e:
        print(f"bench_kernels needs Triton: {e}", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    bench = Bench(device)
    ar, dit = (TINY_AR, TINY_DIT) if args.interpret else (AR, DIT)
    plan = plans(args.quick, args.interpret)
    with torch.inference_mode():
        rows = kernel_rows(gk, bench, dtype, ar, dit, plan)
        faster = {}
        if device.type == "cuda" and not args.no_sdpa:
            sdpa, faster = sdpa_rows(bench, dtype, ar, dit, plan)
            rows += sdpa
    results = [r.as_dict() for r in rows]
    report = build_report(
        "kernels",
        results,
        config={"dtype": args.dtype, "quick": args.quick, "interpret": args.interpret, "plan": plan},
        notes=["ours/twin ms: do_bench medians (L2 flushed); eager us: wall time per call in a loop"],
        device=device,
        # {mask kind: [SDPBackend name, speedup over torch's default dispatch]}, >= 1.1x only
        sdpa_faster_than_default={k: list(v) for k, v in faster.items()},
    )
    if args.out:
        save_report(report, args.out)
    print(_table(results))
    print()
    print(_summary(results, device, faster, sdpa=device.type == "cuda" and not args.no_sdpa))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
