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

__all__ = ["hold_adapters_on", "stage_quantize", "staged_processes"]


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
    named_lora: list[tuple[str, str, float]] = (),
    fixed_lora: list[tuple[str, float]] = (),
    batching: str = "static",
    max_rows: int = 16,
):
    """A ``StagedExecutor`` whose AR and DiT run in two worker processes. The devices are
    checked here, before any worker starts; on a CPU (both stages) the cores are split between
    the two workers unless ``threads`` says otherwise. ``named_lora``: (name, path, scale) of
    ``serve --lora NAME=PATH``, held for requests to pick; ``fixed_lora``: (path, scale) of the
    unnamed ``--lora``, on every request (unmerged). ``batching``: ``static`` (a
    ``StagedExecutor``: batches overlap stage by stage) or ``continuous`` / ``auto`` (a
    ``ContinuousExecutor``: the AR worker's scheduler, driven by ticks, with ``max_rows`` rows)."""
    from ..device import resolve_device
    from .continuous import ContinuousExecutor, check_batching
    from .executors import HandleRunner, StagedExecutor

    check_batching(batching)
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
    if batching == "static":
        executor = StagedExecutor(front, *runners, name="stages")
    else:
        executor = ContinuousExecutor(front, max_rows=max_rows, runners=runners)
    if named_lora or fixed_lora:
        hold_adapters_on(executor, runners, named_lora, fixed_lora)
    return executor


class _Current:
    """A runner's handle as it is now (a replaced worker's successor once there is one): what
    the adapter registry runs its checks on. A worker that never saw ``load`` reads an adapter
    at its first call naming it (the call carries the source: ``lora.StageLora``)."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def run(self, payload, progress=None):
        if self.runner.handle is None:
            raise GlmImageError(f"the {self.runner.stage} stage is not running")
        return self.runner.handle.run(payload, progress)


def hold_adapters_on(executor, runners, named, fixed) -> None:
    """The adapters of stages the server does not load itself (worker processes, Ray replicas):
    the front's registry talks to the runners' handles; once both stages are up
    (``StagedExecutor.start``) each named adapter is checked on them and held, and the unnamed
    ones (``fixed``, unmerged: a replaced worker's weights are the checkpoint's) apply to every
    request. A stage that never saw them (a new worker, another replica) reads them at its first
    call naming them."""
    from ..lora import LoraRegistry

    registry = LoraRegistry({runner.stage: _Current(runner) for runner in runners})
    executor.front.lora = registry

    def hold() -> None:
        for name, path, _ in named:
            registry.load(name, path)
        registry.fixed = registry.resolve(fixed)

    executor.hold_adapters = hold


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
