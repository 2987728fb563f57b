"""The options every command that loads the engine shares: where it runs (device, dtype, ops
backend, weight format, memory) and how it generates (AR decoding, DiT step caching).

One definition for ``glm-image generate``, ``serve`` and ``bench``, so the flags, their help and
their defaults cannot drift apart; and what every command shares on the way out: ``-v`` after the
subcommand, the defaults in --help, messages that name these flags (``as_flags``).
"""

from __future__ import annotations

import argparse

from .engine.choices import (
    DECODINGS,
    DEFAULT_CONTINUED,
    DEFAULT_COUPLED,
    DEFAULT_DRAFTS,
    DEFAULT_WINDOW,
    DIT_CACHES,
    DRAFT_INITS,
    StepCacheOptions,
)
from .ops import CHOICES as BACKEND_NAMES
from .parallel.config import PLACEMENTS, ParallelConfig

__all__ = [
    "DTYPE_NAMES",
    "RUNTIME_FLAGS",
    "VERBOSE_HELP",
    "HelpWithDefaults",
    "add_generation_arguments",
    "add_parallel_arguments",
    "add_runtime_arguments",
    "as_flags",
    "dit_cache_options",
    "generation_kwargs",
    "in_every_command",
    "parallel_config",
    "parallel_kwargs",
    "runtime_kwargs",
    "torch_dtype",
]

DTYPE_NAMES = ("float32", "bfloat16", "float16")

# The library's name of each option these flags set (its error messages start with it) -> the
# flag: what ``as_flags`` says instead, so a command's user reads what they typed.
RUNTIME_FLAGS = {
    "device": "--device",
    "dtype": "--dtype",
    "attention_backend": "--attention-backend",
    "quantize": "--quantize",
    "max_memory": "--max-memory",
    "residency": "--residency",
    "ar_decoding": "--ar-decoding",
    "jacobi_window": "--jacobi-window",
    "jacobi_drafts": "--jacobi-drafts",
    "jacobi_coupled": "--jacobi-coupled",
    "jacobi_continued": "--jacobi-continued",
    "dit_cache threshold": "--dit-cache-threshold",
    "dit_cache warmup": "--dit-cache-warmup",
    "dit_cache max_consecutive": "--dit-cache-max-consecutive",
    "dit_cache taylor": "--dit-cache-taylor",
    "ar_tp": "--ar-tp",
    "dit_sp": "--dit-sp",
    "dit_cfg_parallel": "--dit-cfg-parallel",
    "placement": "--placement",
}


def as_flags(message: str, names: dict[str, str]) -> str:
    """``message`` with the field it starts with named as ``names`` says (``names[field]``).

    The library's messages start with the field they are about ("num_inference_steps = 0; allowed:
    ..."); a command line's user typed a flag. A flag reads as it is typed ("--steps 0; allowed:
    ..."), any other name keeps its " = " ("steps = 0; ..." on a --prompts line). A message that
    starts with no field of ``names`` is returned unchanged.
    """
    for field in sorted(names, key=len, reverse=True):  # "dit_cache warmup" before "dit_cache"
        rest = message[len(field) :]
        if message.startswith(field) and (not rest or rest[0] in " :;"):
            name = names[field]
            if name.startswith("--") and rest.startswith(" = "):
                rest = " " + rest[3:]
            return name + rest
    return message


VERBOSE_HELP = "log progress and timings (before or after the subcommand)"


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's default in --help, where its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or "default" in text
            or text == argparse.SUPPRESS
        ):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):  # a list flag's default as it is typed: 4,8
            default = ",".join(str(item) for item in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


def in_every_command(parser: argparse.ArgumentParser) -> None:
    """``-v`` after any subcommand too (``glm-image generate ... -v``), and the defaults in every
    command's --help. The subcommands' own parsers (serve, bench and theirs) get it here, once."""
    for action in parser._actions:  # argparse keeps its subcommands' parsers only here
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in {id(p): p for p in action.choices.values()}.values():  # aliases: one parser
            sub.formatter_class = HelpWithDefaults
            # SUPPRESS: unset unless given, so it never hides a -v given before the subcommand
            sub.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
            )
            in_every_command(sub)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype``, ``--attention-backend``, ``--quantize`` and ``--max-memory``."""
    parser.add_argument(
        "--device",
        help="cpu | cuda | npu (default: GLM_IMAGE_DEVICE if set, else CUDA, else an Ascend NPU, else cpu)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="default: float32 on cpu, bfloat16 on a GPU or NPU"
    )
    parser.add_argument(
        "--attention-backend",
        choices=BACKEND_NAMES,
        default="auto",
        help="ops backend: auto (triton on CUDA, npu on Ascend, else sdpa), sdpa (torch reference), "
        "triton (our kernels), npu (torch_npu fused ops)",
    )
    parser.add_argument(
        "--quantize",
        metavar="SCHEME",
        help="weight format: none (default) | int8 | fp8 (CUDA, compute capability >= 8.9) | "
        "ar=int4,dit=int8 | per stage, e.g. ar=int8,dit=fp8 | auto (the memory planner picks)",
    )
    parser.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="device memory the engine may use, e.g. 16GB or 24GiB (default: the device's free memory); "
        "the planner keeps both stages resident, swaps them or streams their blocks to fit",
    )
    parser.add_argument(
        "--residency",
        metavar="NAME",
        help="force where the weights live: resident | swap (the stages take turns) | dit_offload "
        "(take turns, the DiT's blocks stream from host memory) | offload (the AR's layers stream "
        "too); default: the memory planner chooses (see `glm-image info --json`)",
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ar-decoding``, ``--jacobi-*`` and the DiT step cache's ``--dit-cache*``."""
    parser.add_argument(
        "--ar-decoding",
        choices=DECODINGS,
        default="sequential",
        help="sequential (default: one AR forward per token; a seed gives the reference's image) or "
        "jacobi (speculative Jacobi windows: the same distribution of images in fewer forwards, not "
        "the same image per seed; greedy decoding gives exactly the sequential tokens)",
    )
    parser.add_argument(
        "--jacobi-window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help=f"tokens checked per Jacobi forward (default {DEFAULT_WINDOW})",
    )
    parser.add_argument(
        "--jacobi-drafts",
        choices=DRAFT_INITS,
        default=DEFAULT_DRAFTS,
        help="a Jacobi draft's first value: last (drawn from the window's last distribution), above "
        "(the token a grid row above) or preview (target grid: the preview's token at its place); "
        "every choice is exact, only the forwards change",
    )
    parser.add_argument(
        "--jacobi-coupled",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_COUPLED,
        help="redraw each Jacobi draft with its position's own noise (MC-SJD; exact)",
    )
    parser.add_argument(
        "--jacobi-continued",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_CONTINUED,
        help="keep the drafts past a rejection with probability min(1, p/q) (SJD-PAC; exact)",
    )
    defaults = StepCacheOptions()
    parser.add_argument(
        "--dit-cache",
        choices=DIT_CACHES,
        default="none",
        help="DiT step caching: none (default) or fbcache (skip the blocks after the first on steps whose "
        "first-block residual barely changed; check a threshold with `bench quality --dit-cache`)",
    )
    parser.add_argument(
        "--dit-cache-threshold",
        type=float,
        default=defaults.threshold,
        metavar="X",
        help=f"relative change below which a step is reused (default {defaults.threshold}; 0: never)",
    )
    parser.add_argument(
        "--dit-cache-warmup",
        type=int,
        default=defaults.warmup,
        metavar="N",
        help=f"first steps always computed (default {defaults.warmup})",
    )
    parser.add_argument(
        "--dit-cache-max-consecutive",
        type=int,
        default=defaults.max_consecutive,
        metavar="N",
        help=f"cached steps in a row at most (default {defaults.max_consecutive})",
    )
    parser.add_argument(
        "--dit-cache-taylor",
        action="store_true",
        help="extrapolate a reused residual to first order (TaylorSeer)",
    )


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ar-tp``, ``--dit-cfg-parallel``, ``--dit-sp`` and ``--placement`` (``glm_image.parallel``)."""
    parser.add_argument(
        "--ar-tp",
        type=int,
        default=1,
        metavar="N",
        help="tensor-parallel AR ranks, one device each (default 1); the released model splits 1, 2, 4, 8, "
        "16 or 32 ways (above 2 ranks its 2 KV heads are replicated)",
    )
    parser.add_argument(
        "--dit-cfg-parallel",
        action="store_true",
        help="the DiT's conditional and unconditional branches on two ranks (with guidance > 1)",
    )
    parser.add_argument(
        "--dit-sp",
        type=int,
        default=1,
        metavar="N",
        help="Ulysses sequence-parallel DiT ranks per branch (default 1; a divisor of the 32 heads whose "
        "split of (height/16)*(width/16) image tokens is even); with --dit-cfg-parallel, 2N DiT ranks",
    )
    parser.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="same",
        help="same (default): the AR's and the DiT's ranks use the same devices from the first; separate: the "
        "DiT's ranks on the devices after the AR's (a stage of several ranks runs in worker processes)",
    )


def parallel_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``GlmImage.from_pretrained`` that ``add_parallel_arguments`` gives."""
    return {
        "ar_tp": args.ar_tp,
        "dit_cfg_parallel": args.dit_cfg_parallel,
        "dit_sp": args.dit_sp,
        "placement": args.placement,
    }


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """The ``add_parallel_arguments`` flags as a ``ParallelConfig`` (not yet checked)."""
    return ParallelConfig(**parallel_kwargs(args))


def torch_dtype(name: str | None):
    """'bfloat16' -> torch.bfloat16; None stays None (the device's default)."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def runtime_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``GlmImage.from_pretrained`` these flags give; a --max-memory
    that is not a size fails here, on every path that reads it, before anything loads."""
    from .residency import check_residency, parse_memory

    parse_memory(args.max_memory)  # its message starts "max_memory": the CLI says --max-memory
    check_residency(args.residency)
    return {
        "device": args.device,
        "dtype": torch_dtype(args.dtype),
        "attention_backend": args.attention_backend,
        "quantize": args.quantize,
        "max_memory": args.max_memory,
        "residency": args.residency,
    }


def dit_cache_options(args: argparse.Namespace) -> StepCacheOptions | None:
    """The ``--dit-cache*`` flags as ``StepCacheOptions`` (checked), or None for ``none``."""
    if args.dit_cache == "none":
        return None
    options = StepCacheOptions(
        threshold=args.dit_cache_threshold,
        warmup=args.dit_cache_warmup,
        max_consecutive=args.dit_cache_max_consecutive,
        taylor=args.dit_cache_taylor,
    )
    options.check()
    return options


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``GlmImage.from_pretrained`` that ``add_generation_arguments`` gives."""
    return {
        "ar_decoding": args.ar_decoding,
        "jacobi_window": args.jacobi_window,
        "jacobi_drafts": args.jacobi_drafts,
        "jacobi_coupled": args.jacobi_coupled,
        "jacobi_continued": args.jacobi_continued,
        "dit_cache": dit_cache_options(args),
    }


def add_lora_arguments(parser: argparse.ArgumentParser, named: bool = False) -> None:
    """``--lora PATH[:SCALE]`` (repeatable): adapters on every image (docs/lora.md); with
    ``named`` (serve) also ``--lora NAME=PATH[:SCALE]``: held for requests to pick by name."""
    extra = "; NAME=PATH[:SCALE] holds it for requests to pick by name" if named else ""
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]" if not named else "[NAME=]PATH[:SCALE]",
        help="a LoRA adapter (a PEFT folder or a diffusers .safetensors), scale 1 by default; repeatable; "
        f"merged into the weights unless they are quantized{extra}",
    )


def lora_kwargs(args: argparse.Namespace) -> dict:
    """``GlmImage.from_pretrained``'s ``lora`` from the unnamed ``--lora`` flags (checked)."""
    from .lora import parse_lora

    return {"lora": [parse_lora(text) for text in args.lora if "=" not in text.split(":", 1)[0]]}


def named_loras(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """The ``--lora NAME=PATH[:SCALE]`` flags of serve: (name, path, default scale)."""
    from .lora import parse_named_lora

    return [parse_named_lora(text) for text in args.lora if "=" in text.split(":", 1)[0]]
