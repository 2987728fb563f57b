"""The one place that picks a stage's kind: the engine in this process or rank processes
(``process.ProcessStage``), from the spec and the devices. Above ``handle`` and ``process``, so
neither imports the other's module back."""

from __future__ import annotations

from collections.abc import Sequence

from .handle import LocalStage, StageHandle, StageSpec, load_stage

__all__ = ["open_stage"]


def open_stage(
    spec: StageSpec,
    devices: Sequence[str] | None = None,
    *,
    processes: bool = False,
    threads: int | None = None,
    answer_seconds: float | None = None,
) -> StageHandle:
    """The handle of ``spec`` on ``devices`` (one per rank; default: ``spec.device``, one rank):
    rank processes when there are several ranks or ``processes`` asks for one of its own (a
    server's stage worker), else the engine loaded here. ``threads``: torch threads per rank
    process on a CPU; ``answer_seconds``: how long a busy rank may stay silent (``process``)."""
    devices = list(devices) if devices is not None else [spec.device]
    if len(devices) == 1 and not processes:
        return LocalStage(spec.stage, load_stage(spec, devices[0]))
    from ..device import resolve_device
    from .process import ProcessStage

    devices = [str(resolve_device(d)) for d in devices]
    return ProcessStage(spec, devices, threads=threads, answer_seconds=answer_seconds)
