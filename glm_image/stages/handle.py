"""A stage you can call: one spec, one loader, one protocol, and the local handle.

Whatever runs a stage (this process, rank processes this process owns, a torchrun rank, a Ray
replica) is held as a ``StageHandle``: ``run(call, progress)`` answers an ``ArCall`` /
``DitCall`` (``calls``), or a function of the engine, on every rank and returns the first
rank's answer; a ``progress`` that raises stops the call (``Cancelled`` where nothing else is
raised); ``broken`` says why no call can run any more (None while one can); ``close()`` frees
it; ``to(device)`` moves an engine of this process (offloading; a no-op elsewhere);
``describe()`` is what ``/health`` shows. The pipeline, the server and Ray hold handles and
never ask which kind.

- ``LocalStage``: an engine loaded in this process (``load_stage``);
- ``process.ProcessStage``: a stage on rank processes this process spawns (one or more; a
  heartbeat finds a rank that stops answering) -- ``GlmImage``'s ``--ar-tp``/``--dit-sp``, the
  server's ``--stages separate`` workers and a Ray replica with several GPUs;
- ``spmd.SpmdStage``: this rank's part under torchrun;
- ``server.ray_app.RayStage``: a Ray Serve deployment.

``opening.open_stage`` picks local or process from the spec and the devices, the one place that
does (a module of its own: it sits above both kinds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .run import run_on

__all__ = ["LocalStage", "StageHandle", "StageSpec", "as_handle", "load_stage"]

STAGES = ("ar", "dit")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StageSpec:
    """What a stage loads: its engine of ``model`` and, on several ranks, its part in the group."""

    stage: str  # "ar" or "dit"
    model: str  # a checkpoint folder, preset name or hub id
    device: str | None = None  # None: the detected platform (a rank's device overrides it)
    dtype: str | None = None  # a torch dtype name; None: the device's default
    attention_backend: str | None = None
    quantize: str | None = None  # the weight format (a scheme naming stages works too)
    tp: int = 1  # AR: tensor-parallel ranks
    cfg: int = 1  # DiT: CFG ranks (1 or 2)
    sp: int = 1  # DiT: Ulysses ranks per CFG branch

    @property
    def size(self) -> int:
        """The stage's ranks."""
        return self.tp if self.stage == "ar" else self.cfg * self.sp


def load_stage(spec: StageSpec, device=None, groups=None):
    """The engine of ``spec`` (``ArEngine`` or ``DitEngine``), chosen as ``GlmImage.from_pretrained``
    chooses for both stages; ``device`` overrides ``spec.device`` (a rank's own device);
    ``groups``: a rank's process groups (``parallel.groups.stage_groups``; None: one rank)."""
    from ..device import default_dtype, resolve_device
    from ..engine import ArEngine, DitEngine
    from ..hub import resolve_checkpoint
    from ..ops import select_ops
    from ..options import torch_dtype

    where = resolve_device(device or spec.device)
    dtype = torch_dtype(spec.dtype) or default_dtype(where)
    ops = select_ops(spec.attention_backend, where)
    engine = ArEngine if spec.stage == "ar" else DitEngine
    return engine.from_pretrained(
        resolve_checkpoint(spec.model),
        device=where,
        dtype=dtype,
        attention_backend=ops,
        quantize=spec.quantize,
        **({} if groups is None else {"tp": groups} if spec.stage == "ar" else {"groups": groups}),
    )


@runtime_checkable
class StageHandle(Protocol):
    """A stage you can call (see the module docstring)."""

    stage: str

    @property
    def broken(self) -> str | None: ...

    def run(self, call, progress: Progress | None = None): ...

    def close(self) -> None: ...

    def to(self, device) -> None: ...

    def describe(self) -> dict: ...


class LocalStage:
    """A stage on an engine of this process."""

    broken = None  # an engine in this process cannot die apart from it

    def __init__(self, stage: str, engine) -> None:
        self.stage, self.engine = stage, engine

    @property
    def device(self):
        return self.engine.device

    def run(self, call, progress: Progress | None = None):
        return run_on(self.stage, self.engine, call, progress)

    def close(self) -> None:
        """The engine goes with its last reference."""

    def to(self, device) -> None:
        self.engine.to(device)

    def describe(self) -> dict:
        return {"handle": "local", "device": str(self.engine.device)}


def as_handle(stage: str, engine_or_handle) -> StageHandle:
    """A handle as it is; an engine (what ``GlmImage(ar, dit)`` is given by hand) as a ``LocalStage``."""
    if isinstance(engine_or_handle, StageHandle):
        return engine_or_handle
    return LocalStage(stage, engine_or_handle)
