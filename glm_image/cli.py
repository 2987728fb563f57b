"""The ``glm-image`` command. Thin: parse arguments, call the library, print, exit.

A mistake a user can make (bad model name, missing or corrupt file) prints one line naming
what is wrong and exits with status 2; it never shows a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .bench.cli import add_parser as add_bench_parser
from .errors import GlmImageError
from .options import DTYPE_NAMES, add_runtime_arguments, runtime_kwargs, torch_dtype
from .request import GenerationRequest, parse_size
from .server.cli import add_parser as add_serve_parser

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> None:
    from .hub import resolve_checkpoint
    from .info import describe_checkpoint, format_checkpoint
    from .synthetic import preset_dir

    if args.preset:
        config, infos = describe_checkpoint(preset_dir(args.preset), count_on_meta=True)
    else:
        config, infos = describe_checkpoint(resolve_checkpoint(args.model))
    print(format_checkpoint(config, infos))
    print(_runtime())


def _runtime() -> str:
    """Where `generate` would run by default, and which ops backend it would choose."""
    import torch

    from .device import default_dtype, detect_platform
    from .ops import BACKENDS, available_backends, select_ops

    device = torch.device(detect_platform().value)
    name = select_ops(None, device).name
    where = f"cuda ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else device.type
    usable = [n for n, why in available_backends(device).items() if why is None]
    dtype = str(default_dtype(device)).removeprefix("torch.")
    return (
        f"Runtime          device {where}, dtype {dtype}; attention: {name} ({BACKENDS[name].about}; "
        f"torch {torch.__version__}); usable here: {', '.join(usable)}"
    )


def _cmd_make_checkpoint(args: argparse.Namespace) -> None:
    from .synthetic import make_checkpoint

    dtype = torch_dtype(args.dtype)
    out = make_checkpoint(args.out, args.preset, seed=args.seed, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote the {args.preset} checkpoint (seed {args.seed}) to {out}")


def _size(text: str) -> tuple[int, int]:
    """'1280x1280' -> (width, height), for argparse."""
    try:
        return parse_size(text)
    except GlmImageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_JSONL_KEYS = ("prompt", "size", "seed", "steps", "guidance")


def _requests(args: argparse.Namespace) -> list[GenerationRequest]:
    """One request per generation: from the positional prompt, or one per line of --prompts."""
    width, height = args.size
    defaults = {
        "width": width,
        "height": height,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "num_images": args.num_images,
        "images": tuple(args.image or ()),
    }
    if args.prompts is None:
        if not args.prompt:
            raise GlmImageError("prompt: give a prompt, or --prompts FILE.jsonl")
        return [GenerationRequest(args.prompt, **defaults)]
    import json

    requests = []
    try:
        lines = open(args.prompts, encoding="utf-8").read().splitlines()  # noqa: SIM115
    except OSError as e:
        raise GlmImageError(f"--prompts {args.prompts}: cannot be read ({e.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts {args.prompts}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise GlmImageError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise GlmImageError(f'{where}: expected an object with a "prompt" string')
        unknown = set(item) - set(_JSONL_KEYS)
        if unknown:
            raise GlmImageError(f"{where}: unknown keys {sorted(unknown)}; allowed: {', '.join(_JSONL_KEYS)}")
        fields = dict(defaults)
        if "size" in item:
            fields["width"], fields["height"] = parse_size(item["size"], f"{where}: size")
        fields.update({k: item[k] for k in ("seed", "steps", "guidance") if k in item})
        requests.append(GenerationRequest(item["prompt"], **fields))
    return requests


def _cmd_generate(args: argparse.Namespace) -> None:
    from PIL.PngImagePlugin import PngInfo
    from tqdm import tqdm

    from .pipeline import GlmImage

    requests = _requests(args)
    pipe = GlmImage.from_pretrained(args.model, **runtime_kwargs(args))
    out = Path(args.output)
    total = sum(request.num_images for request in requests)
    written = 0
    for request in requests:
        bars: dict[str, tqdm] = {}

        def progress(stage: str, done: int, of: int, bars=bars) -> None:
            if stage not in bars:
                label = {"ar": "AR tokens", "dit": "DiT steps"}[stage]
                bars[stage] = tqdm(total=of, desc=label, unit="tok" if stage == "ar" else "step", leave=False)
            bars[stage].update(done - bars[stage].n)

        result = pipe.run(request, progress=progress)
        for bar in bars.values():
            bar.close()
        for image, image_seed in zip(result.images, result.seeds, strict=True):
            written += 1
            path = out if total == 1 else out.with_name(f"{out.stem}-{written}{out.suffix or '.png'}")
            info = PngInfo()
            for key, value in pipe.png_info(
                request.prompt, image_seed, request.height, request.width, request.steps, request.guidance
            ).items():
                info.add_itxt(key, value)
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format="PNG", pnginfo=info)
            timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
            print(f"{path}  ({request.size}, seed {image_seed}; {timing})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-image", description="Local inference engine for GLM-Image.")
    parser.add_argument("--version", action="version", version=f"glm-image {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and timings")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text to image: write PNG files with the parameters embedded")
    gen.add_argument("prompt", nargs="?", help="the prompt (quote the text to render: 'OPEN')")
    gen.add_argument("--prompts", help='a JSONL file, one {"prompt", "size", "seed", ...} per line')
    gen.add_argument("--size", type=_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    gen.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance (default 1.5)")
    gen.add_argument(
        "--seed", type=int, help="seed of the first image; the next ones count up (default: random)"
    )
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument(
        "--image", action="extend", nargs="+", metavar="PATH", help="condition image(s) for image-to-image"
    )
    gen.add_argument("-o", "--output", default="glm-image.png", help="output PNG (numbered when several)")
    gen.add_argument("--model", default="tiny", help="tiny | wide | a checkpoint folder | a Hugging Face id")
    add_runtime_arguments(gen)
    gen.set_defaults(func=_cmd_generate)

    info = sub.add_parser("info", help="show a checkpoint's components, sizes and dtypes")
    which = info.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default="tiny",
        help="tiny | wide | a local checkpoint folder | a Hugging Face id (default: tiny)",
    )
    which.add_argument(
        "--preset",
        choices=("tiny", "wide", "glm-image"),
        help="show a config preset; parameters are counted on the meta device (no memory)",
    )
    info.set_defaults(func=_cmd_info)

    make = sub.add_parser(
        "make-checkpoint", help="write a synthetic checkpoint (random weights, released layout) for tests"
    )
    make.add_argument("out", help="output folder")
    make.add_argument("--preset", choices=("tiny", "wide"), default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        help="default: float32 for tiny, bfloat16 for wide",
    )
    make.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    make.set_defaults(func=_cmd_make_checkpoint)

    add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """The reference libraries log per-shard progress bars and casting notes; not ours to show."""
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except GlmImageError as e:
        print(f"glm-image: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
