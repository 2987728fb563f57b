"""What every benchmark sets up the same way: the device and dtype, and the engines it compares.

``bench speed`` and ``bench quality`` run our pipeline against diffusers' on one checkpoint
(``load_runners``); ``bench ar`` and ``bench dit`` time one stage each. All take the runtime flags
of every other command (``--device``, ``--dtype``, ``--attention-backend``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GlmImageError
from ..options import torch_dtype

__all__ = ["Runners", "StageBench", "load_runners", "resolve_runtime"]


def resolve_runtime(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """``glm_image.device``'s defaults: the detected accelerator in bfloat16, else cpu in float32."""
    from ..device import default_dtype, resolve_device

    dev = resolve_device(device)
    return dev, default_dtype(dev) if dtype is None else torch_dtype(dtype)


@dataclass(frozen=True)
class StageBench:
    """What ``bench ar`` and ``bench dit`` share: the checkpoint, the size, the repeats, the runtime."""

    model: str = "tiny"
    size: tuple[int, int] = (512, 512)  # (width, height)
    repeats: int = 3
    device: str | None = None
    dtype: str | None = None
    attention_backend: str | None = None
    quantize: str | None = None  # ours' weight format (the reference: as stored)

    def check(self) -> None:
        if self.repeats < 1:
            raise GlmImageError(f"--repeats = {self.repeats}; allowed: an integer >= 1")

    def load(self, engine_class):
        """(engine, checkpoint folder, device, dtype), the size checked against the checkpoint."""
        from ..hub import resolve_checkpoint

        self.check()
        device, dtype = resolve_runtime(self.device, self.dtype)
        root = resolve_checkpoint(self.model)
        engine = engine_class.from_pretrained(
            root, device=device, dtype=dtype, attention_backend=self.attention_backend, quantize=self.quantize
        )
        width, height = self.size
        engine.config.size_limits.check_size(height, width)
        return engine, root, device, dtype


@dataclass
class Runners:
    """Our pipeline first, then (with ``compare_reference``) diffusers' on the same weights."""

    root: Path
    device: torch.device
    dtype: torch.dtype
    runners: list
    swap: bool  # on an accelerator the engine that is not running waits in host memory

    @property
    def ours(self):
        return self.runners[0]


def load_runners(options) -> Runners:
    """Ours, loaded and generating as ``options`` say (a ``SpeedOptions`` or ``QualityOptions``:
    model, runtime, quantize, max_memory, ar_decoding, jacobi_*), then, with
    ``options.compare_reference``, diffusers' pipeline on the same weights."""
    from ..hub import resolve_checkpoint
    from .engines import OursRunner, ReferenceRunner

    dev, dt = resolve_runtime(options.device, options.dtype)
    root = resolve_checkpoint(options.model)
    generation = {
        "ar_decoding": options.ar_decoding,
        "jacobi_window": options.jacobi_window,
        "jacobi_drafts": options.jacobi_drafts,
        "jacobi_coupled": options.jacobi_coupled,
        "jacobi_continued": options.jacobi_continued,
        "quantize": options.quantize,
        "max_memory": options.max_memory,
        "residency": getattr(options, "residency", None),
    }
    if getattr(options, "lora", ()):  # bench speed --lora: ours wearing adapters
        generation["lora"] = list(options.lora)
    parallel = getattr(options, "parallel", None)  # bench speed: ours on several devices
    if parallel is not None and parallel.spread:
        generation.update(dataclasses.asdict(parallel))
    ours = OursRunner(root, dev, dt, options.attention_backend, **generation)
    compare_reference = options.compare_reference
    swap = dev.type != "cpu" and compare_reference
    runners: list = [ours]
    if compare_reference:
        if swap:
            ours.park(torch.device("cpu"))
        runners.append(ReferenceRunner(root, dev, dt, load_on=torch.device("cpu") if swap else dev))
    return Runners(root, dev, dt, runners, swap)
