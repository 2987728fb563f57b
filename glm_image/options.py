"""The options every command that loads the engine shares: where it runs (device, dtype, ops
backend) and how it generates (AR decoding).

One definition for ``glm-image generate``, ``serve`` and ``bench``, so the flags, their help and
their defaults cannot drift apart.
"""

from __future__ import annotations

import argparse

from .engine.choices import DECODINGS, DEFAULT_WINDOW
from .ops import CHOICES as BACKEND_NAMES

__all__ = [
    "DTYPE_NAMES",
    "add_generation_arguments",
    "add_runtime_arguments",
    "generation_kwargs",
    "runtime_kwargs",
    "torch_dtype",
]

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--attention-backend``."""
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


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ar-decoding`` and ``--jacobi-window``."""
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


def torch_dtype(name: str | None):
    """'bfloat16' -> torch.bfloat16; None stays None (the device's default)."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def runtime_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``GlmImage.from_pretrained`` these flags give."""
    return {
        "device": args.device,
        "dtype": torch_dtype(args.dtype),
        "attention_backend": args.attention_backend,
    }


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``GlmImage.from_pretrained`` that ``add_generation_arguments`` gives."""
    return {"ar_decoding": args.ar_decoding, "jacobi_window": args.jacobi_window}
