"""The ``glm-image`` command. Thin: parse arguments, call the library, print, exit.

A mistake a user can make (bad model name, missing or corrupt file, a bad value on any line of
--prompts, an output path that cannot be written) prints one line naming what is wrong and exits
with status 2, before the model loads; it never shows a stack trace. The line names the flag the
user typed (``--steps``), or the key of a --prompts line (``steps``), not the Python parameter the
library checks (``num_inference_steps``): ``options.as_flags`` translates, in one place. An engine fault (NaN or Inf
in a result) is one line and status 1; Ctrl-C is one line and status 130. PNGs are written
atomically: a file is the whole new image or what it was before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence

from ._version import __version__
from .bench.cli import add_parser as add_bench_parser
from .errors import GlmImageError
from .options import (
    DTYPE_NAMES,
    RUNTIME_FLAGS,
    VERBOSE_HELP,
    HelpWithDefaults,
    add_generation_arguments,
    add_lora_arguments,
    add_parallel_arguments,
    add_runtime_arguments,
    as_flags,
    generation_kwargs,
    in_every_command,
    lora_kwargs,
    parallel_config,
    parallel_kwargs,
    runtime_kwargs,
    torch_dtype,
)
from .outputs import display, output_paths, write_png
from .request import MAX_IMAGES_PER_PROMPT, GenerationRequest, parse_size
from .server.cli import add_parser as add_serve_parser

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> None:
    """The checkpoint, and with --quantize, --max-memory or --json the memory plan for the device
    and dtype `generate` would use with the same flags (``info.memory_report``): the text renders
    the same plan as the JSON."""
    from .device import resolve_device
    from .hub import resolve_checkpoint
    from .info import describe_checkpoint, format_checkpoint, format_memory_report, memory_report
    from .residency import check_residency, parse_memory
    from .synthetic import preset_dir

    device = resolve_device(args.device)  # a bad --device or --max-memory: one line, before any work
    parse_memory(args.max_memory)
    check_residency(args.residency)
    parallel = parallel_config(args)
    parallel.check()
    root = preset_dir(args.preset) if args.preset else resolve_checkpoint(args.model)
    report = None
    if args.json or args.quantize or args.max_memory or args.residency or parallel.spread:
        report = memory_report(
            root,
            args.quantize,
            dtype=torch_dtype(args.dtype),
            device=device,
            detected=args.device is None,
            max_memory=args.max_memory,
            residency=args.residency,
            parallel=parallel,
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    config, infos = describe_checkpoint(root, count_on_meta=bool(args.preset))
    print(format_checkpoint(config, infos))
    print(_runtime(device))
    if report is not None:
        print(format_memory_report(report))
    if args.check_backend:
        print(_check_backend(args, config))


def _check_backend(args: argparse.Namespace, config) -> str:
    """Run the ops backend's self-check visibly: every kernel against its torch twin, at this
    checkpoint's sizes, on the device and dtype the flags name (the engines run the same check
    before their first forward)."""
    from .bench.runtime import resolve_runtime
    from .ops import CheckSizes, check_backend, format_check

    device, dtype = resolve_runtime(args.device, args.dtype)
    rows = check_backend(args.attention_backend, device, dtype, CheckSizes.from_config(config))
    return format_check(rows)


def _runtime(device) -> str:
    """Where `generate` would run (``device``: --device, else the detected one), and which ops
    backend it would choose."""
    import torch

    from .device import default_dtype
    from .ops import BACKENDS, available_backends, select_ops

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
MAX_PROMPTS_BYTES = 16 * 2**20  # a --prompts file larger than this is not a prompt list

# What the library calls a request's fields (its messages start with one) -> the flag that sets it
# on the command line, and the key of a --prompts line (None: only a flag sets it)
_REQUEST_FIELDS = {
    "num_inference_steps": ("--steps", "steps"),
    "guidance_scale": ("--guidance", "guidance"),
    "seed": ("--seed", "seed"),
    "num_images_per_prompt": ("--num-images", None),
}


@dataclasses.dataclass(frozen=True)
class _Source:
    """One generation asked for: where it was asked (for messages: "" for the positional prompt, or
    the --prompts line), the request, and how its messages name its fields (``as_flags``)."""

    where: str
    request: GenerationRequest
    names: dict[str, str]

    def error(self, error: GlmImageError) -> GlmImageError:
        text = as_flags(str(error), self.names)
        return GlmImageError(f"{self.where}: {text}" if self.where else text)


def _names(item: dict, size: str) -> dict[str, str]:
    """How a request's fields are named in its messages: a key of its --prompts line ``item``
    where the line sets it, else the flag (whose value it then took)."""
    names = dict(RUNTIME_FLAGS)
    for field, (flag, key) in _REQUEST_FIELDS.items():
        names[field] = key if key in item else flag
    in_line = "size" in item
    for side in ("height", "width"):  # both come from one WIDTHxHEIGHT value: name it and the side
        names[side] = f"size {item['size']}: {side}" if in_line else f"--size {size}: {side}"
    names["size"] = "size" if in_line else "--size"
    return names


def _requests(args: argparse.Namespace) -> list[_Source]:
    """One ``_Source`` per generation: the positional prompt, or one per line of --prompts."""
    width, height = args.size
    size = f"{width}x{height}"
    defaults = {
        "width": width,
        "height": height,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "num_images": args.num_images,
        "images": tuple(args.image or ()),
        "fit_images": args.fit_image,
    }
    if args.prompts is None:
        if args.prompt is None:
            raise GlmImageError("prompt: give a prompt, or --prompts FILE.jsonl")
        return [_Source("", GenerationRequest(args.prompt, **defaults), _names({}, size))]
    if args.prompt is not None:
        raise GlmImageError("prompt: give a prompt or --prompts FILE.jsonl, not both")
    sources = []
    for number, line in _prompt_lines(args.prompts):
        if not line.strip():
            continue
        where = f"--prompts {args.prompts}, line {number}"
        item = _json_line(line, where)
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise GlmImageError(f'{where}: expected an object with a "prompt" string')
        unknown = set(item) - set(_JSONL_KEYS)
        if unknown:
            raise GlmImageError(f"{where}: unknown keys {sorted(unknown)}; allowed: {', '.join(_JSONL_KEYS)}")
        fields = dict(defaults)
        if "size" in item:
            fields["width"], fields["height"] = parse_size(item["size"], f"{where}: size")
        fields.update({k: item[k] for k in ("seed", "steps", "guidance") if k in item})
        sources.append(_Source(where, GenerationRequest(item["prompt"], **fields), _names(item, size)))
    if not sources:
        raise GlmImageError(f"--prompts {args.prompts}: no prompts in it (every line is empty)")
    return sources


def _json_line(line: str, where: str):
    """One --prompts line as JSON; whatever it holds, a mistake in it is one line naming it."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise GlmImageError(f"{where}: not JSON ({e.msg})") from None
    except RecursionError:  # "[[[[..." deeper than Python's recursion limit
        raise GlmImageError(f"{where}: nested too deeply; allowed: one flat JSON object") from None
    except ValueError:  # an integer past Python's digit limit for int() (4300 digits)
        raise GlmImageError(
            f"{where}: a number with too many digits; allowed: seeds up to 2**63 - 1"
        ) from None


def _prompt_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (a BOM is allowed); errors name the line."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPTS_BYTES + 1)
    except OSError as e:
        raise GlmImageError(f"--prompts {path}: cannot be read ({e.strerror})") from None
    if len(data) > MAX_PROMPTS_BYTES:
        raise GlmImageError(f"--prompts {path}: larger than {MAX_PROMPTS_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise GlmImageError(
            f"--prompts {path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None
    return list(enumerate(text.splitlines(), 1))


def _cmd_generate(args: argparse.Namespace) -> None:
    """Every input is checked (all requests, condition images, output paths) before the model
    loads, so a mistake costs seconds, not a generation."""
    import warnings

    from PIL import Image

    from .config import CheckpointConfig
    from .hub import resolve_checkpoint
    from .validation import IdleCacheWarning, check_request, idle_step_cache

    sources = _requests(args)
    paths = iter(output_paths(args.output, sum(s.request.num_images for s in sources)))
    config = CheckpointConfig.from_dir(resolve_checkpoint(args.model))
    parallel = parallel_config(args)
    parallel.check(config)  # the device count is checked as the engine starts, before any weights
    cache = generation_kwargs(args)["dit_cache"]
    with warnings.catch_warnings():
        # a picture big enough for Pillow's bomb warning is refused, not decoded
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        images = _condition_images(args, config.size_limits)
        requests = []
        for source in sources:
            request = dataclasses.replace(source.request, images=images)
            try:
                requests.append(check_request(config.size_limits, request))
                parallel.check_size(request.height, request.width)
            except GlmImageError as e:
                raise source.error(e) from None
    for idle in dict.fromkeys(idle_step_cache(cache, r.steps) for r in requests):  # once each
        if idle is not None:
            print(
                f"glm-image: warning: --dit-cache fbcache: {as_flags(idle, RUNTIME_FLAGS)}", file=sys.stderr
            )

    from .pipeline import GlmImage

    pipe = GlmImage.from_pretrained(
        args.model,
        **runtime_kwargs(args),
        **generation_kwargs(args),
        **parallel_kwargs(args),
        **lora_kwargs(args),
    )
    with pipe, warnings.catch_warnings():  # a stage on several ranks: its workers stop with the command
        warnings.simplefilter("ignore", IdleCacheWarning)  # the pipeline's own: said above, in flags
        _generate_all(pipe, requests, paths)


def _condition_images(args: argparse.Namespace, limits) -> tuple:
    """The --image files, each opened and checked once (every request uses them), named as typed;
    with --fit-image, one of a size the model does not take is fitted to the nearest it does."""
    from .validation import open_condition_image

    return tuple(
        open_condition_image(
            path, f"--image {display(path)}", limits, fit=args.fit_image, fit_option="--fit-image"
        )
        for path in args.image or ()
    )


def _generate_all(pipe, requests: list[GenerationRequest], paths) -> None:
    """Each request in turn, its images written to the next ``paths`` with a progress bar per
    stage (under torchrun, by the first rank alone: the others take part and write nothing)."""
    from .progress import StageBars

    for request in requests:
        if not pipe.answers:
            pipe.run(request)
            continue
        bars = StageBars()
        try:
            result = pipe.run(request, progress=bars)
        finally:
            bars.close()
        timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
        for index, image in enumerate(result.images):
            path = next(paths)
            text = pipe.png_info(request, result, index)
            write_png(image, path, text)
            cost = (
                f"AR {text['ar_forwards']} forwards for {result.ar_tokens} tokens, DiT {text['dit_forwards']}"
            )
            print(f"{display(path)}  ({request.size}, seed {text['seed']}; {timing}; {cost})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-image",
        description="Local inference engine for GLM-Image.",
        formatter_class=HelpWithDefaults,
    )
    parser.add_argument("--version", action="version", version=f"glm-image {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="text to image: write PNG files with the parameters embedded",
        description="Write PNG files with the prompt, seed and parameters embedded as text. Every input "
        "is checked before the model loads.",
        epilog="Example: glm-image generate \"A storefront sign that says 'OPEN'\" --size 1280x1280 --seed 42 "
        "-o open.png --model /path/to/GLM-Image",
    )
    gen.add_argument(
        "prompt", nargs="?", help="the prompt (quote the text to render: 'OPEN'); at most 1000 characters"
    )
    gen.add_argument(
        "--prompts", help='a JSONL file, one {"prompt", "size", "seed", "steps", "guidance"} per line'
    )
    gen.add_argument(
        "--size",
        type=_size,
        default=(1024, 1024),
        metavar="WIDTHxHEIGHT",
        help="output size; each side in the checkpoint's range in multiples of 32: 512..2048 for the released "
        "model, 64..1024 for tiny (default 1024x1024)",
    )
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    gen.add_argument(
        "--guidance", type=float, default=1.5, help="classifier-free guidance, 1 (off) to 20 (default 1.5)"
    )
    gen.add_argument(
        "--seed", type=int, help="seed of the first image; the next ones count up (default: random)"
    )
    gen.add_argument(
        "--num-images",
        type=int,
        default=1,
        metavar="N",
        help=f"images per prompt, made as one batch (default 1, at most {MAX_IMAGES_PER_PROMPT})",
    )
    gen.add_argument(
        "--image",
        action="extend",
        nargs="+",
        metavar="PATH",
        help="condition image(s) for image-to-image; each follows the output size rule (its own size, "
        "not necessarily the output's)",
    )
    gen.add_argument(
        "--fit-image",
        action="store_true",
        help="resize and centre-crop a condition image of a size the model does not take to the nearest "
        "size it does (said on stderr), instead of an error",
    )
    gen.add_argument(
        "-o",
        "--output",
        default="glm-image.png",
        help="output PNG, numbered when several (default: glm-image.png)",
    )
    gen.add_argument(
        "--model",
        default="tiny",
        help="tiny | wide | glm-image-random | a checkpoint folder | a Hugging Face id (default: tiny, random weights: noise)",
    )
    add_runtime_arguments(gen)
    add_generation_arguments(gen)
    add_parallel_arguments(gen)
    add_lora_arguments(gen)
    gen.set_defaults(func=_cmd_generate)

    info = sub.add_parser("info", help="show a checkpoint's components, sizes and dtypes")
    which = info.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default="tiny",
        help="tiny | wide | glm-image-random | a local checkpoint folder | a Hugging Face id (default: tiny)",
    )
    which.add_argument(
        "--preset",
        choices=("tiny", "wide", "glm-image"),
        help="show a config preset; parameters are counted on the meta device (no memory)",
    )
    info.add_argument(
        "--json",
        action="store_true",
        help="print the components' parameters and bytes under --quantize, and the memory plan for "
        "1024x1024 (--max-memory, --device), as JSON",
    )
    info.add_argument(
        "--check-backend",
        action="store_true",
        help="run the ops backend's self-check (each kernel against its torch twin) and print a table",
    )
    add_runtime_arguments(info)
    add_parallel_arguments(info)
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
    in_every_command(parser)
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
    from .errors import NonFiniteError, StageDied

    try:
        args.func(args)
    except KeyboardInterrupt:
        print("glm-image: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports for Ctrl-C
    except (NonFiniteError, StageDied) as e:  # an engine fault, not the user's input
        print(f"glm-image: error: {e}", file=sys.stderr)
        return 1
    except GlmImageError as e:  # the shared options' checks name their Python parameter: say the flag
        print(f"glm-image: error: {as_flags(str(e), RUNTIME_FLAGS)}", file=sys.stderr)
        return 2
    except Exception as e:
        torch = sys.modules.get("torch")  # an out-of-memory error comes from torch, so it is loaded
        if torch is None or not isinstance(e, torch.OutOfMemoryError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        print(
            f"glm-image: error: the device ran out of memory ({first}); see `glm-image info --json` for "
            "the plan, and try --max-memory, --residency dit_offload or --quantize int8",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
