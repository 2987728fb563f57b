"""How the server's engine calls run: the executors under the one FastAPI app.

The queue (``jobs.EngineQueue``) batches requests and pushes each batch through the executor's
``stages`` in order; a stage has ``slots`` (how many batches it works on at once) and an async
``run(work, abandoned)``. The queue starts the next batch as soon as the first stage has a free
slot, so with two stages one batch's AR runs while the previous batch's DiT runs.

- ``InProcessExecutor``: one stage, ``GlmImage.run_batch`` on one engine thread (the default);
- ``StagedExecutor``: an AR stage and a DiT stage, each on its own runner: ``ThreadRunner`` (a
  loaded engine in a thread of this process), ``workers.ProcessRunner`` (a worker process with
  its own engine and device) or ``ray_app.RayRunner`` (a Ray Serve deployment). Only
  ``PriorTokens`` passes from the AR stage to the DiT stage (see ``stagework``).

``ModelFront`` is what the API needs of a model without loading it (name, size rule, request
checks, PNG text): the server process of a staged or Ray executor holds no weights.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ..config.checkpoint import SizeLimits
from ..engine.choices import DEFAULT_WINDOW, StepCacheOptions, check_decoding
from ..parallel.config import ParallelConfig
from ..pipeline import GlmImage
from ..stages import DitCall, outputs_of, plan_call, run_stage
from .stagework import Abandoned

__all__ = [
    "Executor",
    "InProcessExecutor",
    "ModelFront",
    "Stage",
    "StageDied",
    "StagedExecutor",
    "ThreadRunner",
]

Abandon = Callable[[], bool]  # True once every request of the call is abandoned


def _stop_when(abandoned: Abandon) -> Callable[[str, int, int], None]:
    """A progress callback that stops the engine call (``Abandoned``) once ``abandoned()``."""

    def progress(stage: str, done: int, total: int) -> None:
        if abandoned():
            raise Abandoned

    return progress


class StageDied(Exception):
    """A stage's worker (process, replica) stopped while it ran a call; the message says which
    and what happens next. Shown to the client: it holds nothing but our own words."""


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Any, Abandon], Awaitable[Any]]
    slots: int = 1


class Executor(Protocol):
    name: str
    stages: tuple[Stage, ...]
    broken: str | None  # why no call can run any more (a worker that cannot restart); None: fine

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def describe(self) -> dict: ...


class ModelFront:
    """The model as the API sees it, without its weights: built from the checkpoint's configs."""

    # GlmImage's own methods, on the same attributes: one copy of the request checks and PNG text.
    validate_request = GlmImage.validate_request
    _checked = GlmImage._checked
    png_info = GlmImage.png_info
    parallel = ParallelConfig()  # one process: a worker per stage, or Ray replicas

    def __init__(
        self,
        name: str,
        limits: SizeLimits,
        ar_decoding: str = "sequential",
        jacobi_window: int = DEFAULT_WINDOW,
        dit_cache: StepCacheOptions | None = None,
        quantize: str = "none",
    ) -> None:
        check_decoding(ar_decoding, jacobi_window)
        if dit_cache is not None:
            dit_cache.check()
        self.name, self.limits = name, limits
        self.ar_decoding, self.jacobi_window, self.dit_cache = ar_decoding, jacobi_window, dit_cache
        self.quantize = quantize

    @classmethod
    def from_checkpoint(cls, model: str, **options) -> ModelFront:
        """``model`` as ``GlmImage.from_pretrained`` takes it; only its config files are read."""
        from ..config.checkpoint import CheckpointConfig
        from ..hub import resolve_checkpoint

        return cls(str(model), CheckpointConfig.from_dir(resolve_checkpoint(model)).size_limits, **options)

    @classmethod
    def of(cls, pipe) -> ModelFront:
        return cls(
            str(pipe.name), pipe.limits, pipe.ar_decoding, pipe.jacobi_window, pipe.dit_cache, pipe.quantize
        )


class InProcessExecutor:
    """Both stages in this process, one engine call at a time on one engine thread (always the
    same one, which CUDA prefers): ``pipe.run_batch`` for same-size text-to-image requests,
    ``pipe.run`` for one image-to-image request."""

    name = "in-process"

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.stages = (Stage("engine", self._run),)
        self._thread: ThreadPoolExecutor | None = None

    @property
    def broken(self) -> str | None:
        return _stopped(getattr(self.pipe, "ar", None)) or _stopped(getattr(self.pipe, "dit", None))

    async def start(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm-image-engine")

    async def stop(self) -> None:
        if self._thread is not None:
            # An engine call already running cannot be interrupted; do not wait for it.
            self._thread.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict:
        return {"mode": self.name, "device": str(getattr(self.pipe, "device", ""))}

    async def _run(self, requests: list, abandoned: Abandon) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._call, requests, abandoned)

    def _call(self, requests: list, abandoned: Abandon) -> list:
        """Runs on the engine thread."""
        progress = _stop_when(abandoned)
        if requests[0].images:
            return [self.pipe.run(requests[0], progress)]
        return self.pipe.run_batch(requests, progress)


class Runner(Protocol):
    """Where one stage's calls run (a thread, a worker process, a Ray deployment)."""

    slots: int
    broken: str | None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def run(self, payload, abandoned: Abandon): ...

    def describe(self) -> dict: ...


def _stopped(engine) -> str | None:
    """Why ``engine`` can run no call any more: a stage on rank processes
    (``parallel.StageGroup``) whose group stopped because a rank died; None for an engine."""
    reason = getattr(engine, "broken", None)
    return reason if isinstance(reason, str) else None


class ThreadRunner:
    """A stage on its own thread: an engine loaded in this process, or a stage on rank
    processes (``parallel.StageGroup``) this process drives."""

    slots = 1

    def __init__(self, stage: str, engine) -> None:
        self.stage, self.engine = stage, engine
        self._thread: ThreadPoolExecutor | None = None

    @property
    def broken(self) -> str | None:
        return _stopped(self.engine)

    async def start(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"glm-image-{self.stage}")

    async def stop(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict:
        return {"runner": "thread", "device": str(getattr(self.engine, "device", ""))}

    async def run(self, payload, abandoned: Abandon):
        progress = _stop_when(abandoned)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, run_stage, self.stage, self.engine, payload, progress)


class StagedExecutor:
    """The AR stage and the DiT stage on separate runners, overlapped by the queue: while one
    batch's DiT runs, the next batch's AR runs. Only ``PriorTokens`` crosses between them."""

    def __init__(self, front: ModelFront, ar: Runner, dit: Runner, name: str = "stages") -> None:
        self.front, self.ar, self.dit, self.name = front, ar, dit, name
        self.stages = (Stage("ar", self._ar, ar.slots), Stage("dit", self._dit, dit.slots))

    @classmethod
    def in_threads(cls, pipe) -> StagedExecutor:
        """The two stages of a loaded ``GlmImage``, each on its own thread (``serve
        --placement separate``: stages on devices of their own, their ranks driven from here)."""
        return cls(ModelFront.of(pipe), ThreadRunner("ar", pipe.ar), ThreadRunner("dit", pipe.dit), "threads")

    @property
    def broken(self) -> str | None:
        return self.ar.broken or self.dit.broken

    async def start(self) -> None:
        # both load at once; if one fails the other is stopped, so nothing is left running
        results = await asyncio.gather(self.ar.start(), self.dit.start(), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.stop()
            raise failed[0]

    async def stop(self) -> None:
        await asyncio.gather(self.ar.stop(), self.dit.stop())

    def describe(self) -> dict:
        return {"mode": self.name, "ar": self.ar.describe(), "dit": self.dit.describe()}

    async def _ar(self, requests: list, abandoned: Abandon) -> tuple:
        front = self.front
        call = plan_call(requests, front.limits, front.ar_decoding, front.jacobi_window)
        return requests, await self.ar.run(call, abandoned)

    async def _dit(self, work: tuple, abandoned: Abandon) -> list:
        requests, prior = work
        first = requests[0]  # one batch_key: the same steps and guidance for all
        made = await self.dit.run(
            DitCall(prior, first.steps, first.guidance, self.front.dit_cache), abandoned
        )
        return outputs_of(requests, prior, made)
