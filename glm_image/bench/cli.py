"""`glm-image bench speed|quality|ar|dit|plan`: arguments here; the harness, the reference libraries, the
OCR and matplotlib are imported only when a command runs.

Every command prints a Markdown table and, with ``--out``, writes the JSON report (the layout of
``glm_image.bench.report``, documented in benchmarks/README.md).
"""

from __future__ import annotations

import argparse

from ..engine.choices import DEFAULT_WINDOW
from ..errors import GlmImageError
from ..options import (
    add_generation_arguments,
    add_lora_arguments,
    add_parallel_arguments,
    add_runtime_arguments,
    generation_kwargs,
    lora_kwargs,
    parallel_kwargs,
)
from ..request import parse_size

__all__ = ["add_parser"]


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except GlmImageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _list(convert, example: str):
    """An argparse type: comma-separated values, each through ``convert``; an error names the list."""

    def parse(text: str) -> tuple:
        try:
            return tuple(convert(part.strip()) for part in text.split(",") if part.strip())
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {e}; expected a comma-separated list, e.g. {example}"
            ) from None

    return parse


_sizes = _list(_size, "512x512,1024x768")
_ints = _list(int, "1,4")
_floats = _list(float, "0.5,0.9")
_names = _list(str, "last,above")


def _model_and_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny | wide | glm-image-random | a checkpoint folder | a Hugging Face id",
    )
    add_runtime_arguments(parser)
    parser.add_argument("--out", help="write the JSON report here")


def _common(parser: argparse.ArgumentParser) -> None:
    _model_and_runtime(parser)
    # ours decodes with --ar-decoding; with --dit-cache it also runs cached (engine ours_cached)
    add_generation_arguments(parser)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generation (default 0)")
    parser.add_argument(
        "--compare-reference",
        action="store_true",
        help="also run diffusers' GlmImagePipeline on the same weights",
    )


def add_parser(sub) -> None:
    bench = sub.add_parser(
        "bench", help="speed against the reference (end to end or per stage); text-rendering quality"
    )
    which = bench.add_subparsers(dest="bench_command", required=True)

    speed = which.add_parser(
        "speed",
        help="seconds per stage and per image, tokens/s, peak memory; ours vs the reference",
        description="Time our engine (and, with --compare-reference, diffusers' GlmImagePipeline on the same "
        "checkpoint) per stage: AR prefill, AR decode tokens/s, DiT seconds/step, VAE, seconds per image, "
        "peak memory; on a GPU also the fraction of the hardware floor.",
    )
    _common(speed)
    speed.add_argument(
        "--sizes", type=_sizes, default=((1024, 1024),), help="WxH[,WxH...] (default 1024x1024)"
    )
    speed.add_argument("--batch", type=_ints, default=(1,), help="images per call, e.g. 1,4 (default 1)")
    speed.add_argument(
        "--repeats", type=int, default=3, help="timed calls per engine and case; medians (default 3)"
    )
    speed.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per engine and case first (default 1)"
    )
    speed.add_argument("--prompt", help="the prompt (default: a poster with quoted text)")
    speed.add_argument(
        "--max-ar-tokens",
        type=int,
        help="benchmarks only: stop both AR models after N tokens and fill the rest of the grid with code 0 "
        "(bounds slow CPU runs; the images are then not real ones)",
    )
    speed.add_argument(
        "--plot", metavar="PATH.png", help="bar chart of the per-stage seconds (needs matplotlib)"
    )
    add_parallel_arguments(speed)
    add_lora_arguments(speed)
    speed.set_defaults(func=_run_speed)

    quality = which.add_parser(
        "quality",
        help="generate a prompt set, OCR the images, score the rendered text (CVTG-2K, LongText-Bench)",
        description="Generate images for a prompt set, read them back with OCR (RapidOCR, offline) and score "
        "them: CVTG-2K Word Accuracy and NED, LongText-Bench text score.",
    )
    _common(quality)
    quality.add_argument(
        "--suite",
        default="cvtg",
        help="cvtg | longtext (built in) | a .jsonl file | an official CVTG-2K or LongText-Bench file or folder",
    )
    quality.add_argument("--limit", type=int, help="only the first N prompts")
    quality.add_argument("--size", type=_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    quality.add_argument("--save-images", metavar="DIR", help="also write every generated image here")
    quality.set_defaults(func=_run_quality)

    ar = which.add_parser(
        "ar",
        help="AR decode tokens/s: ours vs transformers' generate on the same weights",
        description="Time the AR stage alone: our engine against transformers' "
        "GlmImageForConditionalGeneration.generate on the same checkpoint, alternating runs.",
    )
    _model_and_runtime(ar)
    ar.add_argument("--size", type=_size, default=(512, 512), help="WIDTHxHEIGHT (default 512x512)")
    ar.add_argument("--repeats", type=int, default=3, help="timed runs per engine; medians (default 3)")
    ar.add_argument(
        "--max-tokens", type=int, help="generate at most N tokens (default: the whole protocol at the size)"
    )
    ar.add_argument("--greedy", action="store_true", help="argmax instead of the checkpoint's sampling")
    ar.add_argument("--images", type=int, default=1, help="images per call, one seed each (default 1)")
    ar.add_argument(
        "--ar-decoding",
        type=_names,
        default=("sequential",),
        help="decoders besides the reference: sequential[,jacobi] (sequential always runs: the baseline)",
    )
    ar.add_argument(
        "--jacobi-window",
        type=_ints,
        default=(DEFAULT_WINDOW,),
        help=f"windows, e.g. 4,8 (default {DEFAULT_WINDOW})",
    )
    ar.add_argument("--jacobi-drafts", type=_names, default=("last",), help="draft sources, e.g. last,above")
    ar.add_argument(
        "--jacobi-options",
        type=_names,
        default=("default",),
        help="draft renewals to compare: default, plain, coupled, continued, coupled+continued",
    )
    ar.add_argument(
        "--temperatures", type=_floats, default=(), help="sampling temperatures (default: the checkpoint's)"
    )
    ar.add_argument(
        "--sharpen",
        action="store_true",
        help="measure a copy of the model with sharp AR distributions (random weights accept few drafts)",
    )
    ar.add_argument("--no-reference", action="store_true", help="skip transformers' generate")
    ar.set_defaults(func=_run_ar)

    dit = which.add_parser(
        "dit",
        help="DiT seconds per CFG step: ours vs diffusers' transformer on the same weights",
        description="Time one classifier-free-guidance denoising step: our batched forward against "
        "diffusers' two transformer forwards, on the same inputs and checkpoint.",
    )
    _model_and_runtime(dit)
    dit.add_argument("--size", type=_size, default=(512, 512), help="WIDTHxHEIGHT (default 512x512)")
    dit.add_argument("--repeats", type=int, default=3, help="timed runs per engine; medians (default 3)")
    dit.set_defaults(func=_run_dit)

    plan = which.add_parser(
        "plan",
        help="AR:DiT replica counts for a Ray Serve deployment, from a `bench speed` report",
        description="Propose how many AR and DiT replicas to deploy on N accelerators (serve --ray, "
        "deploy/glm-image-ray.yaml) from the per-stage times of a `glm-image bench speed --out` report.",
    )
    plan.add_argument("speed_report", metavar="SPEED.json", help="a `glm-image bench speed --out` report")
    plan.add_argument("--gpus", type=int, default=8, help="accelerators in the cluster (default 8)")
    plan.add_argument("--ar-gpus", type=int, default=1, help="accelerators per AR replica (default 1)")
    plan.add_argument("--dit-gpus", type=int, default=1, help="accelerators per DiT replica (default 1)")
    plan.add_argument("--out", help="write the JSON report here")
    plan.set_defaults(func=_run_plan)


def _generation(args: argparse.Namespace) -> dict:
    """How ours loads and generates (``--quantize``, ``--ar-decoding``) and the step cache it is
    also measured with."""
    return {
        **generation_kwargs(args),
        "quantize": args.quantize,
        "max_memory": args.max_memory,
        "residency": args.residency,
    }


def _check_outputs(args: argparse.Namespace) -> None:
    """``--out`` (and ``--plot``) checked before any work: a path found unwritable only when the
    report is written would lose the whole run."""
    from .report import check_output_path

    if getattr(args, "out", None) is not None:
        check_output_path(args.out, "--out")
    if getattr(args, "plot", None) is not None:
        from .plot import check_plot_path

        check_plot_path(args.plot)


def _bar(total: int | None, what: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, unit="run", leave=False)
    return bar, lambda: bar.update(1)


def _run_speed(args: argparse.Namespace) -> None:
    from .report import save_report
    from .runtime import resolve_runtime
    from .speed import DEFAULT_PROMPT, SpeedOptions, format_speed, run_speed

    options = SpeedOptions(
        model=args.model,
        sizes=args.sizes,
        steps=args.steps,
        batches=args.batch,
        compare_reference=args.compare_reference,
        repeats=args.repeats,
        warmup=args.warmup,
        prompt=args.prompt or DEFAULT_PROMPT,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        max_ar_tokens=args.max_ar_tokens,
        **_generation(args),
        **parallel_kwargs(args),
        lora=tuple(lora_kwargs(args)["lora"]),
    )
    options.check()  # bad options, a missing device or matplotlib fail now, not after loading models
    _check_outputs(args)
    resolve_runtime(options.device, options.dtype)
    engines = 1 + bool(args.compare_reference) + (options.dit_cache is not None)
    runs = (
        len(options.sizes)
        * len(options.batches)
        * engines
        * (max(options.warmup, 0) + max(options.repeats, 0))
    )
    bar, progress = _bar(runs, "bench speed")
    try:
        report = run_speed(options, progress)
    finally:
        bar.close()
    if args.out:
        save_report(report, args.out)
    if args.plot:
        from .plot import plot_speed

        plot_speed(report, args.plot)
    print(format_speed(report))


def _run_quality(args: argparse.Namespace) -> None:
    from .quality import QualityOptions, format_quality, run_quality
    from .report import save_report
    from .suites import load_suite

    if args.steps < 1:
        raise GlmImageError(f"--steps = {args.steps}; allowed: an integer >= 1")
    _check_outputs(args)
    options = QualityOptions(
        suite=args.suite,
        limit=args.limit,
        model=args.model,
        size=args.size,
        steps=args.steps,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        compare_reference=args.compare_reference,
        save_images=args.save_images,
        **_generation(args),
    )
    engines = 1 + bool(args.compare_reference) + (options.dit_cache is not None)
    count = len(load_suite(args.suite, args.limit)) * engines
    bar, progress = _bar(count, "bench quality")
    try:
        report = run_quality(options, progress)
    finally:
        bar.close()
    if args.out:
        save_report(report, args.out)
    print(format_quality(report))


def _run_stage(args: argparse.Namespace, options_class, run, format_report, **extra) -> None:
    """``bench ar`` / ``bench dit``: the options, a progress bar over the repeats, the report."""
    from .report import save_report

    options = options_class(
        model=args.model,
        size=args.size,
        repeats=args.repeats,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        quantize=args.quantize,
        **extra,
    )
    options.check()
    _check_outputs(args)
    bar, progress = _bar(None, f"bench {args.bench_command}")
    try:
        report = run(options, progress)
    finally:
        bar.close()
    if args.out:
        save_report(report, args.out)
    print(format_report(report))


def _run_ar(args: argparse.Namespace) -> None:
    from .ar import ArBenchOptions, format_ar, run_ar

    _run_stage(
        args,
        ArBenchOptions,
        run_ar,
        format_ar,
        max_tokens=args.max_tokens,
        greedy=args.greedy,
        images=args.images,
        decodings=args.ar_decoding,
        windows=args.jacobi_window,
        drafts=args.jacobi_drafts,
        jacobi_options=args.jacobi_options,
        temperatures=args.temperatures,
        sharpen=args.sharpen,
        compare_reference=not args.no_reference,
    )


def _run_plan(args: argparse.Namespace) -> None:
    from .plan import format_plan, load_speed_report, plan_from_speed
    from .report import save_report

    _check_outputs(args)
    plan = plan_from_speed(load_speed_report(args.speed_report), args.gpus, args.ar_gpus, args.dit_gpus)
    if args.out:
        save_report(plan, args.out)
    print(format_plan(plan))


def _run_dit(args: argparse.Namespace) -> None:
    from .dit import DitBenchOptions, format_dit, run_dit

    _run_stage(args, DitBenchOptions, run_dit, format_dit)
