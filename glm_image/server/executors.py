"""How the server's engine calls run: the executors under the one FastAPI app.

The queue (``jobs.EngineQueue``) batches requests and pushes each batch through the executor's
``stages`` in order; a stage has ``slots`` (how many batches it works on at once) and an async
``run(work, abandoned)``. The queue starts the next batch as soon as the first stage has a free
slot, so with two stages one batch's AR runs while the previous batch's DiT runs.

- ``InProcessExecutor``: one stage, ``GlmImage.run_batch`` on one engine thread (the default);
- ``StagedExecutor``: an AR stage and a DiT stage, each a ``HandleRunner``: a stage handle
  (``glm_image.stages``: rank processes of the pipeline, a worker process of its own
  (``workers``), a Ray Serve deployment (``ray_app``)) called on a thread of its own. The runner
  never asks which kind it holds; given a way to reopen it, it replaces a handle that died.
  Only ``PriorTokens`` passes from the AR stage to the DiT stage.

``ModelFront`` is what the API needs of a model without loading it (name, size rule, request
checks, PNG text): the server process of a staged or Ray executor holds no weights.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ..config.checkpoint import SizeLimits
from ..engine.choices import (
    DEFAULT_CONTINUED,
    DEFAULT_COUPLED,
    DEFAULT_DRAFTS,
    DEFAULT_WINDOW,
    JacobiDrafts,
    StepCacheOptions,
    check_decoding,
)
from ..errors import Cancelled, StageDied
from ..parallel.config import ParallelConfig
from ..pipeline import GlmImage
from ..stages import DitCall, StageHandle, outputs_of, plan_call
from .errors import ApiError

__all__ = [
    "Executor",
    "HandleRunner",
    "InProcessExecutor",
    "ModelFront",
    "Stage",
    "StagedExecutor",
    "Watch",
    "start_runners",
]

log = logging.getLogger("glm_image.server")

Abandon = Callable[[], bool]  # True once every request of the call is abandoned


class Watch:
    """The ``abandoned`` the queue hands a stage call: true once every request of the call is
    abandoned; ``report`` also gets the call's progress (stage, done, total) where the stage can
    report it (in this process and from worker processes; not from a Ray replica)."""

    def __init__(self, abandoned: Abandon, report: Callable[[str, int, int], None]) -> None:
        self.abandoned, self.report = abandoned, report

    def __call__(self) -> bool:
        return self.abandoned()


def _stop_when(abandoned: Abandon) -> Callable[[str, int, int], None]:
    """A progress callback that stops the engine call (``Cancelled``) once ``abandoned()``, and
    passes the progress on to a ``Watch``."""

    def progress(stage: str, done: int, total: int) -> None:
        if isinstance(abandoned, Watch):
            abandoned.report(stage, done, total)
        if abandoned():
            raise Cancelled

    return progress


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
        jacobi_drafts: str = DEFAULT_DRAFTS,
        jacobi_coupled: bool = DEFAULT_COUPLED,
        jacobi_continued: bool = DEFAULT_CONTINUED,
    ) -> None:
        check_decoding(ar_decoding, jacobi_window)
        self.jacobi = JacobiDrafts(jacobi_drafts, jacobi_coupled, jacobi_continued)
        self.jacobi.check()
        if dit_cache is not None:
            dit_cache.check()
        self.name, self.limits = name, limits
        self.ar_decoding, self.jacobi_window, self.dit_cache = ar_decoding, jacobi_window, dit_cache
        self.quantize = quantize
        self.lora = None  # the loaded pipeline's adapters (``lora.LoraRegistry``), if any

    @classmethod
    def from_checkpoint(cls, model: str, **options) -> ModelFront:
        """``model`` as ``GlmImage.from_pretrained`` takes it; only its config files are read."""
        from ..config.checkpoint import CheckpointConfig
        from ..hub import resolve_checkpoint

        return cls(str(model), CheckpointConfig.from_dir(resolve_checkpoint(model)).size_limits, **options)

    @classmethod
    def of(cls, pipe) -> ModelFront:
        front = cls(
            str(pipe.name), pipe.limits, pipe.ar_decoding, pipe.jacobi_window, pipe.dit_cache, pipe.quantize,
            **pipe.jacobi.kwargs(),
        )  # fmt: skip
        front.lora = pipe.lora
        return front


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
        handles = getattr(self.pipe, "handles", ())  # a test's stand-in pipe may have none
        return next((h.broken for h in handles if h.broken is not None), None)

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


class HandleRunner:
    """One stage's handle, called on a thread of its own (a call blocks until its answer). With
    ``reopen`` (the server started the stage: a worker process), a handle that died is replaced:
    the call it ran fails (``StageDied``: a 500 naming it) and a new one opens; calls that come
    meanwhile wait for it, and one found dead between calls is replaced before the next call
    runs. A handle that cannot open again leaves the stage ``broken`` (503s, said in /health).
    Without ``reopen`` (the pipeline's own handles, Ray's) a dead handle stays broken.
    ``slots``: calls it runs at once, each on a thread (a Ray deployment's replicas; one with
    ``reopen``: a handle runs one call at a time)."""

    def __init__(
        self,
        stage: str,
        handle: StageHandle | None = None,
        reopen: Callable[[], StageHandle] | None = None,
        slots: int = 1,
    ) -> None:
        if reopen is not None and slots != 1:
            raise ValueError("a handle the runner reopens runs one call at a time (slots = 1)")
        self.stage, self.handle, self.reopen, self.slots = stage, handle, reopen, slots
        self.restarts = 0
        self._failed: str | None = None  # a handle that could not open again
        self._thread: ThreadPoolExecutor | None = None
        self._ready: asyncio.Event | None = None
        self._lock: asyncio.Semaphore | None = None
        self._reopening: asyncio.Future | None = None

    @property
    def broken(self) -> str | None:
        if self._failed is not None or self.handle is None:
            return self._failed
        return None if self.reopen is not None else self.handle.broken  # reopened on the next call

    async def start(self) -> None:
        self._thread = ThreadPoolExecutor(
            max_workers=self.slots, thread_name_prefix=f"glm-image-{self.stage}"
        )
        self._ready, self._lock = asyncio.Event(), asyncio.Semaphore(self.slots)
        if self.handle is None:
            self.handle = await self._on_thread(self.reopen)
        self._ready.set()

    async def stop(self) -> None:
        if self._reopening is not None:
            self._reopening.cancel()
            await asyncio.gather(self._reopening, return_exceptions=True)
        handle, self.handle = self.handle, None
        if handle is not None and self.reopen is not None:  # ours to close (the pipeline closes its own)
            await asyncio.to_thread(handle.close)
        if self._thread is not None:
            # a call already running cannot be interrupted here; do not wait for it
            self._thread.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict:
        described = self.handle.describe() if self.handle is not None else {}
        return {**described, "slots": self.slots, "restarts": self.restarts}

    async def _on_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def run(self, payload, abandoned: Abandon):
        async with self._lock:
            await self._ready.wait()
            if self._failed is None and self.reopen is not None and self.handle.broken is not None:
                await self._replace(self.handle.broken)  # it died between calls
                await self._ready.wait()
            if self.broken is not None:
                raise ApiError("unavailable", f"the server cannot generate: {self.broken}")
            try:
                return await self._on_thread(self.handle.run, payload, _stop_when(abandoned))
            except StageDied as e:
                if self.reopen is None:
                    raise
                await self._replace(str(e))
                raise StageDied(f"{e}; a new one is starting") from None

    async def _replace(self, why: str) -> None:
        """Close the dead handle; a new one opens on the stage's thread (before any later call)."""
        log.error("the %s stage died: %s", self.stage, why)
        self._ready.clear()
        await asyncio.to_thread(self.handle.close)
        self._reopening = asyncio.ensure_future(self._reopen())

    async def _reopen(self) -> None:
        try:
            self.handle = await self._on_thread(self.reopen)
            self.restarts += 1
        except Exception as e:  # any failure leaves the stage broken, said in /health
            self._failed = f"the {self.stage} stage worker died and could not start again ({e})"
        finally:
            self._ready.set()


async def start_runners(runners, hold_adapters: Callable[[], None] | None = None) -> None:
    """Start ``runners`` at once (their workers load together), then ``hold_adapters`` (every
    adapter checked on the workers before the first request); if anything fails, every runner
    is stopped, so nothing is left running, and the first error is raised."""
    results = await asyncio.gather(*(r.start() for r in runners), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if not failed and hold_adapters is not None:
        try:
            await asyncio.to_thread(hold_adapters)
        except Exception as e:
            failed = [e]
    if failed:
        await asyncio.gather(*(r.stop() for r in runners), return_exceptions=True)
        raise failed[0]


class StagedExecutor:
    """The AR stage and the DiT stage on separate runners, overlapped by the queue: while one
    batch's DiT runs, the next batch's AR runs. Only ``PriorTokens`` crosses between them."""

    def __init__(self, front: ModelFront, ar, dit, name: str = "stages") -> None:
        self.front, self.ar, self.dit, self.name = front, ar, dit, name
        self.stages = (Stage("ar", self._ar, ar.slots), Stage("dit", self._dit, dit.slots))
        # the DiT step cache forwards a subset of a batch's rows, which per-image adapters cannot
        # follow: then the queue batches only requests that chose the same adapters
        self.mixes_adapters = front.dit_cache is None
        self.hold_adapters: Callable[[], None] | None = None  # run once the stages are up

    @classmethod
    def in_threads(cls, pipe) -> StagedExecutor:
        """The two stages of a loaded ``GlmImage``, each on its own thread (``serve
        --placement separate``: stages on devices of their own, their ranks driven from here)."""
        ar, dit = pipe.handles
        return cls(ModelFront.of(pipe), HandleRunner("ar", ar), HandleRunner("dit", dit), "threads")

    @property
    def broken(self) -> str | None:
        return self.ar.broken or self.dit.broken

    async def start(self) -> None:
        await start_runners((self.ar, self.dit), self.hold_adapters)

    async def stop(self) -> None:
        await asyncio.gather(self.ar.stop(), self.dit.stop())

    def describe(self) -> dict:
        return {"mode": self.name, "ar": self.ar.describe(), "dit": self.dit.describe()}

    async def _ar(self, requests: list, abandoned: Abandon) -> tuple:
        front = self.front
        call = plan_call(requests, front.limits, front.ar_decoding, front.jacobi_window, front.jacobi)
        adapters = front.lora.for_requests(requests) if front.lora is not None else {}
        prior = await self.ar.run(dataclasses.replace(call, lora=adapters.get("ar")), abandoned)
        return requests, adapters.get("dit"), prior

    async def _dit(self, work: tuple, abandoned: Abandon) -> list:
        requests, lora, prior = work
        first = requests[0]  # one batch_key: the same steps and guidance for all
        made = await self.dit.run(
            DitCall(prior, first.steps, first.guidance, self.front.dit_cache, lora), abandoned
        )
        return outputs_of(requests, prior, made)
