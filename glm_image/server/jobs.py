"""The bounded request queue and its one engine worker.

One worker owns the engine: it takes the oldest waiting job plus every other waiting job with
the same ``GenerationRequest.batch_key`` (same size, steps, guidance; text-to-image) up to
``max_batch`` images, and makes ONE ``pipe.run_batch`` call for them (image-to-image jobs run
alone through ``pipe.run``). ``run_batch`` keeps each request's own seeds, so a request gets the
images it would get alone. The call is blocking torch code, so it runs on a dedicated engine
thread (always the same one, which CUDA prefers), never on the event loop.

When an engine call with several requests raises, each of its requests still waited for runs
again alone, so one request that breaks the engine (a fault its values did not reveal) fails
alone and the others get the images they would have got anyway.

A job leaves the queue without running when its client disconnects or its timeout passes while
it waits. A running engine call is stopped at its next step (through the pipeline's progress
callback) once every job in it has been abandoned the same way. Queue state is touched only on
the event loop thread; the engine thread reads nothing but the jobs' ``abandoned`` flags.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import GlmImageError, NonFiniteError
from ..request import GenerationRequest
from .errors import ApiError
from .metrics import Metrics
from .settings import ServerSettings

__all__ = ["ClientGone", "EngineQueue", "Job"]

log = logging.getLogger("glm_image.server")


class ClientGone(Exception):
    """The client disconnected before its result was ready; there is no one to answer."""


class _Abandoned(Exception):
    """Raised inside a running engine call whose every job was abandoned, to stop it early."""


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # its client left or its time ran out; read by the engine thread


class EngineQueue:
    def __init__(self, pipe, settings: ServerSettings, metrics: Metrics) -> None:
        self.pipe, self.settings, self.metrics = pipe, settings, metrics
        self._waiting: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self.running = 0  # jobs in the engine call now running

    @property
    def depth(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm-image-engine")
        self._task = asyncio.create_task(self._work(), name="glm-image-engine-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._waiting:
            job = self._waiting.popleft()
            if not job.future.done():
                job.future.set_exception(ApiError("unavailable", "the server is shutting down"))
        if self._executor is not None:
            # An engine call already running cannot be interrupted; do not wait for it.
            self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a validated request, or raise 429 when ``max_queue`` jobs already wait."""
        if len(self._waiting) >= self.settings.max_queue:
            raise ApiError(
                "queue_full",
                f"the queue is full ({self.settings.max_queue} requests waiting); retry later",
            )
        job = Job(request, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        self._wakeup.set()
        return job

    async def result(self, job: Job, disconnected: Awaitable[None]):
        """The job's ``GenerationOutput``; drops the job when its client leaves or time runs out.

        Raises ``ApiError`` (timeout, engine failure) or ``ClientGone``.
        """
        watcher = asyncio.ensure_future(disconnected)
        remaining = job.arrived + self.settings.timeout - time.perf_counter()
        try:
            done, _ = await asyncio.wait(
                {job.future, watcher}, timeout=max(remaining, 0), return_when=asyncio.FIRST_COMPLETED
            )
            if job.future.done():
                return job.future.result()
            if watcher in done:
                self._drop(job, "disconnected")
                raise ClientGone
            self._drop(job, "timeout")
            raise ApiError(
                "timeout",
                f"no result within the server's timeout of {self.settings.timeout:g} s; retry later",
            )
        except asyncio.CancelledError:
            self._drop(job, "cancelled")
            raise
        finally:
            watcher.cancel()

    def _drop(self, job: Job, reason: str) -> None:
        job.abandoned = True
        if job in self._waiting:
            self._waiting.remove(job)
            self.metrics.count_dropped(reason)
            log.info("dropped a queued %s request (%s)", job.request.size, reason)
        job.future.cancel()  # a running job's result, when it comes, goes nowhere

    def _take(self) -> list[Job]:
        """The oldest job, plus the waiting jobs that can share its engine call."""
        first = self._waiting.popleft()
        batch, images = [first], first.request.num_images
        if first.request.images:
            return batch
        for job in list(self._waiting):
            request = job.request
            if (
                request.batch_key == first.request.batch_key
                and images + request.num_images <= self.settings.max_batch
            ):
                self._waiting.remove(job)
                batch.append(job)
                images += request.num_images
        return batch

    def _call(self, batch: list[Job]) -> list:
        """Runs on the engine thread."""

        def progress(stage: str, done: int, total: int) -> None:
            if all(job.abandoned for job in batch):
                raise _Abandoned

        requests = [job.request for job in batch]
        if requests[0].images:
            return [self.pipe.run(requests[0], progress)]
        return self.pipe.run_batch(requests, progress)

    async def _work(self) -> None:
        while True:
            while not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take()
            now = time.perf_counter()
            for job in batch:
                self.metrics.observe("queue_wait", now - job.arrived)
            await self._run(batch)

    async def _run(self, batch: list[Job]) -> None:
        """One engine call; when a call of several requests raises, each runs again alone."""
        loop = asyncio.get_running_loop()
        self.running = len(batch)
        try:
            outputs = await loop.run_in_executor(self._executor, self._call, batch)
        except _Abandoned:
            self.metrics.count_engine_call(len(batch), None, stopped=True)
            log.info("stopped an engine call: all %d of its requests were abandoned", len(batch))
        except Exception as e:
            self.metrics.count_engine_call(len(batch), None)
            if len(batch) == 1:
                self._fail(batch, e)
                return
            self.metrics.count_split()
            log.warning(
                "an engine call of %d requests raised %s; running each of them alone",
                len(batch),
                type(e).__name__,
            )
            for job in batch:
                if not job.abandoned:
                    await self._run([job])
        else:
            self.metrics.count_engine_call(len(batch), outputs[0].timings)
            self.metrics.count_images(sum(len(output.images) for output in outputs))
            for job, output in zip(batch, outputs, strict=True):
                if not job.future.done():
                    job.future.set_result(output)
        finally:
            self.running = 0

    def _fail(self, batch: list[Job], error: Exception) -> None:
        if isinstance(error, GlmImageError) and not isinstance(error, NonFiniteError):
            # validated before queueing, so rare; still the user's
            failure = ApiError("invalid_value", str(error))
        else:
            error_id = secrets.token_hex(8)
            log.error("engine failure, error id %s", error_id, exc_info=error)
            what = (
                "produced NaN or Inf for this request, so no image was made"
                if isinstance(error, NonFiniteError)
                else "failed on this request"
            )
            failure = ApiError(
                "internal",
                f"the engine {what} (error id {error_id}); the server keeps serving",
                error_id=error_id,
            )
        for job in batch:
            if not job.future.done():
                job.future.set_exception(failure)
