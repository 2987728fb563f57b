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

from . import __version__
from .errors import GlmImageError

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


def _cmd_make_checkpoint(args: argparse.Namespace) -> None:
    import torch

    from .synthetic import make_checkpoint

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    out = make_checkpoint(args.out, args.preset, seed=args.seed, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote the {args.preset} checkpoint (seed {args.seed}) to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-image", description="Local inference engine for GLM-Image.")
    parser.add_argument("--version", action="version", version=f"glm-image {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and timings")
    sub = parser.add_subparsers(dest="command", required=True)

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
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 for tiny, bfloat16 for wide",
    )
    make.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    make.set_defaults(func=_cmd_make_checkpoint)
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
