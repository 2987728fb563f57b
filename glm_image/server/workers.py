"""``serve --stages separate``: the AR and the DiT each in a worker process of its own.

A worker is a ``stages.ProcessStage`` of one rank (its own engine and device, one call at a time;
a fresh interpreter, never a fork of a process holding torch threads or a CUDA context), the same
handle that runs a stage on several ranks: it dies with the server, a call it dies in fails
naming it (a 500 with an error id), and a worker that stops answering (SIGSTOP, a hang) counts as
dead after ``GLM_IMAGE_RANK_TIMEOUT`` seconds. The executor's ``HandleRunner`` then starts a new
one; one that cannot start again leaves the server answering 503, its /health saying why.
"""

from __future__ import annotations

import functools
import os

from ..errors import GlmImageError
from ..stages import StageSpec, open_stage

__all__ = ["stage_quantize", "staged_processes"]


def staged_processes(
    front,
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    attention_backend: str | None = None,
    quantize: str | None = None,
    ar_device: str | None = None,
    dit_device: str | None = None,
    threads: int | None = None,
):
    """A ``StagedExecutor`` whose AR and DiT run in two worker processes. The devices are
    checked here, before any worker starts; on a CPU (both stages) the cores are split between
    the two workers unless ``threads`` says otherwise."""
    from ..device import resolve_device
    from .executors import HandleRunner, StagedExecutor

    where = {"ar": ar_device or device, "dit": dit_device or device}
    resolved = {stage: resolve_device(name) for stage, name in where.items()}
    if threads is None and all(d.type == "cpu" for d in resolved.values()):
        threads = max(1, (os.cpu_count() or 2) // 2)
    runners = [
        HandleRunner(
            stage,
            reopen=functools.partial(
                open_stage,
                StageSpec(stage, model, str(resolved[stage]), dtype, attention_backend, quantize),
                processes=True,
                threads=threads if resolved[stage].type == "cpu" else None,
            ),
        )
        for stage in ("ar", "dit")
    ]
    return StagedExecutor(front, *runners, name="stages")


def stage_quantize(quantize: str | None) -> str | None:
    """The weight format for stage workers, checked before any starts. ``auto`` needs the whole
    pipeline's memory planner (both stages on one device), so stages apart take a named scheme."""
    from ..quant import parse_quantize

    scheme = parse_quantize(quantize)
    if str(scheme) == "auto":
        raise GlmImageError(
            "quantize = 'auto' plans both stages on one device; with the stages apart name the "
            "format, e.g. int8 or ar=int4,dit=int8"
        )
    return quantize
