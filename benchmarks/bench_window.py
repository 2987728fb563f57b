"""Jacobi window attention against the sequential decode step: the kernel, and a whole forward.

    python benchmarks/bench_window.py --out results/bench_window.json        # CUDA: both parts
    python benchmarks/bench_window.py --part kernel --batch 1,4               # one part
    python benchmarks/bench_window.py --dry-run                               # CPU smoke run

Issue 24's target: a Jacobi forward of a W = 8 window costs at most 1.2x a sequential forward, at
batch 1 and 4, in bfloat16 and int8 (on the H200 a W = 4 forward saved 41% of the forwards but
only 5% of the time while the window's attention ran torch SDPA with a dense mask).

``kernel``: at the released attention shapes (32 query / 2 KV heads x 128, a cache of 4608 slots
filled to about 4500, rows at different positions), one layer's attention: ``decode_attention``
(one query per row), ``window_attention`` at W = 4, 8, 16, and the path the window kernel
replaced (the dense (B, 1, W, C) mask built and SDPA over the cache sliced to the bound: the
``sdpa`` twin, ``window_attention_reference``). Each row's ``ratio`` is its time over the decode
step's; ``max_abs_diff`` holds the kernel against the twin on the same inputs. ``--sweep``
adds the window kernel at the given chunk lengths (the default chunking is the decode step's:
enough chunks to cover the SMs once), to tune it.

``forward``: ``ArModel`` at the released widths with ``--layers`` layers (random weights made on
the device; the embedding and the image head are the released sizes), the ``triton`` backend,
bfloat16 and int8 weights: one sequential step (one token per row) against one Jacobi window
(W tokens per row at per-row slots), logits included, each captured in a CUDA graph with a
device-tensor bound as the engine's ``decode_step='graph'`` runs them, and eager with an int
bound. ``ratio`` = window / sequential in the same configuration: the number the target is on.
Per layer the widths are the released ones, so the ratio of the attention to the linears is too.

Each time is ``triton.testing.do_bench``'s median on CUDA (milliseconds). ``--dry-run`` runs
tiny shapes and the tiny preset on the CPU (kernels in Triton's interpreter): it checks the
script, its timings mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import build_report, ratio, save_report
from bench_kernels import Bench  # do_bench's median on CUDA, one call's wall time elsewhere

RELEASED = {"heads": 32, "kv": 2, "head_dim": 128, "capacity": 4608, "fill": 4500}
TINY = {"heads": 4, "kv": 2, "head_dim": 32, "capacity": 96, "fill": 80}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _graph(fn, device: torch.device):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first): its replay. On a CPU,
    ``fn`` itself."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _rows(b: int, w: int, fill: int, device: torch.device) -> torch.Tensor:
    """(B, W) query slots: row r's window ends 37 r slots (fewer in a dry run) before the fullest
    row's, at ``fill`` (rows at their own positions, as Jacobi rows that accepted different counts)."""
    apart = min(37, fill // 8)
    ends = torch.tensor([fill - apart * r for r in range(b)], device=device)
    return ends[:, None] - w + torch.arange(1, w + 1, device=device)


# ---------------------------------------------------------------------- one layer's attention


def kernel_rows(gk, bench: Bench, shapes: dict, batches, windows, dtype, sweep=()) -> list[dict]:
    return [row for b in batches for row in _kernel_batch(gk, bench, shapes, b, windows, dtype, sweep)]


def _kernel_batch(gk, bench: Bench, shapes: dict, b: int, windows, dtype, sweep) -> list[dict]:
    dev = bench.device
    h, kv, d, capacity, fill = (shapes[k] for k in ("heads", "kv", "head_dim", "capacity", "fill"))
    scale = d**-0.5
    g = torch.Generator(device="cpu").manual_seed(b)
    keys, values = (torch.randn(b, kv, capacity, d, generator=g).to(dev, dtype) for _ in range(2))
    visible = torch.zeros(b, capacity, dtype=torch.bool, device=dev)
    visible[:, 7:fill] = True  # left padding, then the generated slots
    q = torch.randn(b, h, 1, d, generator=g).to(dev, dtype)
    decode_ms = bench(lambda: gk.decode_attention(q, keys, values, visible, scale=scale, length=fill))
    moved = 2 * b * kv * fill * d * keys.element_size()
    rows = [_row("decode_attention", b, 1, dtype, decode_ms, decode_ms, moved)]
    for w in windows:
        args = (
            torch.randn(b, h, w, d, generator=g).to(dev, dtype),
            keys,
            values,
            visible,
            _rows(b, w, fill, dev),
        )
        ours = gk.window_attention(*args, scale=scale, length=fill)
        twin = gk.window_attention_reference(*args, scale=scale, length=fill)
        diff = float((ours.float() - twin.float()).abs().max())
        plan = gk.window_attention_plan(*args[:3], fill)
        note = f"split {plan['split_size']}x{plan['splits']} rows {plan['m_blocks']}x{plan['block_m']}"
        ms = bench(lambda a=args: gk.window_attention(*a, scale=scale, length=fill))
        rows.append(_row("window_attention", b, w, dtype, ms, decode_ms, moved, diff, note))
        ms = bench(lambda a=args: gk.window_attention_reference(*a, scale=scale, length=fill))
        rows.append(_row("dense mask + sdpa (replaced)", b, w, dtype, ms, decode_ms, moved))
        for split in sweep:  # the chunk length, to tune ``default_split_size`` for windows
            plan = gk.window_attention_plan(*args[:3], fill, split_size=split)
            ms = bench(
                lambda a=args, n=split: gk.window_attention(*a, scale=scale, length=fill, split_size=n)
            )
            note = f"split {split}x{plan['splits']} rows {plan['m_blocks']}x{plan['block_m']} (sweep)"
            rows.append(_row("window_attention", b, w, dtype, ms, decode_ms, moved, None, note))
    return rows


def _row(what, b, w, dtype, ms, decode_ms, moved, diff=None, note="") -> dict:
    return {
        "part": "kernel",
        "what": what,
        "batch": b,
        "window": w,
        "dtype": str(dtype).removeprefix("torch."),
        "ms": ms,
        "ratio": ratio(ms, decode_ms),
        "gb_per_s": round(moved / (ms * 1e-3) / 1e9, 1) if ms else None,
        "max_abs_diff": diff,
        "note": note,
    }


# ---------------------------------------------------------------------- a whole forward


def _model(layers: int, dry: bool, device: torch.device, dtype: torch.dtype, quant: str):
    from glm_image.config import CheckpointConfig
    from glm_image.models.ar import ArModel
    from glm_image.ops.selfcheck import CheckSizes
    from glm_image.ops.triton_ops import TritonOps
    from glm_image.synthetic import preset_dir

    config = CheckpointConfig.from_dir(preset_dir("tiny" if dry else "glm-image"))
    text = dataclasses.replace(config.ar.text, num_hidden_layers=layers)
    ops = TritonOps(device)
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they run (released widths: GBs)
        model = ArModel(text, ops).to(dtype).eval()
    sizes = CheckSizes.from_config(config)
    ops.verify(dtype, sizes)  # before any capture: the lazy check cannot run inside one
    if quant != "none":
        from glm_image.quant.formats import quantize
        from glm_image.quant.linear import QuantLinear, quantized_linears

        for name in quantized_linears(model):
            parent, attr = name.rsplit(".", 1)
            linear = model.get_submodule(name)
            setattr(
                model.get_submodule(parent),
                attr,
                QuantLinear(quantize(linear.weight, quant), linear.bias, ops),
            )
        ops.verify_quant(dtype, quant, sizes)
    return model, ops


def forward_rows(bench: Bench, args, shapes: dict, dtype: torch.dtype) -> list[dict]:
    rows = []
    for quant in args.quant:
        model, ops = _model(args.layers, args.dry_run, bench.device, dtype, quant)
        for b in args.batch:
            base = None
            for name, (graph_ms, eager_ms) in _forward_times(
                bench, model, b, args.forward_window, shapes
            ).items():
                base = base or (graph_ms, eager_ms)  # the sequential step's, first
                rows.append(
                    {
                        "part": "forward",
                        "what": name,
                        "batch": b,
                        "window": 1 if name == "sequential" else args.forward_window,
                        "dtype": str(dtype).removeprefix("torch."),
                        "weights": quant,
                        "layers": args.layers,
                        "graph_ms": graph_ms,
                        "eager_ms": eager_ms,
                        "ratio": ratio(graph_ms, base[0]),
                        "eager_ratio": ratio(eager_ms, base[1]),
                        "fallbacks": sorted({op for op, _ in ops.fallbacks}),
                    }
                )
        del model, ops
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _forward_times(bench: Bench, model, b: int, w: int, shapes: dict) -> dict[str, tuple[float, float]]:
    """{"sequential" | "jacobi W=w": (graph ms, eager ms)}: one step of B rows, the cache filled
    to about ``fill`` (the window's rows at their own positions)."""
    from glm_image.models.ar import KVCache, rotary_tables

    dev, text = bench.device, model.config
    dtype = model.embed_tokens.weight.dtype
    capacity, fill = shapes["capacity"], shapes["fill"]
    cache = KVCache(text, b, capacity, dev, dtype)
    cache.keys.normal_()
    cache.values.normal_()
    visible = torch.zeros(b, capacity, dtype=torch.bool, device=dev)
    visible[:, 7 : fill + w] = True
    bound = fill + w
    tensor_bound = torch.tensor([bound], dtype=torch.int32, device=dev)

    def inputs(t: int):
        positions = torch.full((3, b, t), fill, device=dev)
        return torch.zeros(b, t, dtype=torch.long, device=dev), rotary_tables(positions, text, dtype)

    steps = {
        "sequential": (*inputs(1), torch.tensor([fill - 1], device=dev)),
        f"jacobi W={w}": (*inputs(w), _rows(b, w, fill + w - 1, dev)),
    }
    times = {}
    with torch.inference_mode():
        for name, (ids, rope, slots) in steps.items():

            def step(length, ids=ids, rope=rope, slots=slots):
                return model.logits(model(ids, rope, cache, slots, visible=visible, length=length))

            times[name] = (bench(_graph(lambda: step(tensor_bound), dev)), bench(lambda: step(bound)))
    return times


# ---------------------------------------------------------------------- report


def _table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["part"] == "kernel":
            diff = "" if r["max_abs_diff"] is None else f"max|diff| {r['max_abs_diff']:.1e} "
            lines.append(
                f"kernel  {r['what']:<30} B{r['batch']} W{r['window']:<3} {r['dtype']:<9} {r['ms']:9.4f} ms  "
                f"x{r['ratio']:<6} {r['gb_per_s'] or 0:7.0f} GB/s  {diff}{r['note']}"
            )
        else:
            lines.append(
                f"forward {r['what']:<30} B{r['batch']} W{r['window']:<3} {r['dtype']:<9} {r['weights']:<5} "
                f"graph {r['graph_ms']:9.4f} ms x{r['ratio']:<6} eager {r['eager_ms']:9.4f} ms x{r['eager_ratio']}"
                + (f"  fallbacks: {', '.join(r['fallbacks'])}" if r["fallbacks"] else "")
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("kernel", "forward", "both"), default="both")
    parser.add_argument("--batch", type=_ints, default=(1, 4))
    parser.add_argument("--windows", type=_ints, default=(4, 8, 16), help="kernel part")
    parser.add_argument(
        "--sweep", type=_ints, default=(), help="kernel part: chunk lengths to try, e.g. 128,256,512"
    )
    parser.add_argument("--forward-window", type=int, default=8)
    parser.add_argument("--quant", type=lambda s: tuple(s.split(",")), default=("none", "int8"))
    parser.add_argument(
        "--layers", type=int, default=4, help="forward part: AR layers at the released widths"
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke run: tiny shapes, the interpreter")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before the import
        device, shapes = torch.device("cpu"), TINY
        args.layers = min(args.layers, 2)
    elif torch.cuda.is_available():
        device, shapes = torch.device("cuda"), RELEASED
    else:
        print("bench_window times CUDA kernels and there is no GPU here; use --dry-run", file=sys.stderr)
        return 2
    import glm_image_kernels as gk

    dtype = getattr(torch, args.dtype)
    bench = Bench(device)
    rows = []
    with torch.inference_mode():
        if args.part in ("kernel", "both"):
            rows += kernel_rows(gk, bench, shapes, args.batch, args.windows, dtype, args.sweep)
    if args.part in ("forward", "both"):
        rows += forward_rows(bench, args, shapes, dtype)
    config = {k: v for k, v in vars(args).items() if k != "out"} | {"shapes": shapes}
    report = build_report(
        "window",
        rows,
        config=config,
        notes=[
            "ms: do_bench medians; ratio: over the sequential step (kernel: decode_attention) in the same run"
        ],
        device=device,
    )
    if args.out:
        save_report(report, args.out)
    print(_table(rows))
    if device.type == "cpu":
        print("(dry run: the timings mean nothing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
