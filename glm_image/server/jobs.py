"""The bounded request queue, and the batches it pushes through the executor's stages.

The queue takes the oldest waiting job plus every other waiting job with the same
``GenerationRequest.batch_key`` (same size, steps, guidance; text-to-image) up to ``max_batch``
images, and sends them through the executor (``executors``) as ONE engine call: with the
in-process executor one ``pipe.run_batch``; with a staged one an AR call, then a DiT call.
Image-to-image jobs run alone. Each image keeps its own seed, so a request gets the images it
would get alone.

A batch is taken only when the executor's first stage has a free slot (so waiting requests
batch as long as the engine is busy), and at most as many batches are in flight as all stages
have slots: with an AR stage and a DiT stage of one slot each, batch N+1's AR runs while batch
N's DiT runs, and a third batch waits in the queue.

When an engine call with several requests raises, each of its requests still waited for runs
again alone, so one request that breaks the engine (a fault its values did not reveal, a worker
that died) fails alone and the others get the images they would have got anyway.

A job leaves the queue without running when its client disconnects or its timeout passes while
it waits. A running engine call is stopped at its next step (through the stages' progress
callbacks) once every job in it has been abandoned the same way, and a batch nobody waits for
any more does not enter its next stage. Queue state is touched only on the event loop thread;
the stage threads read nothing but the jobs' ``abandoned`` flags, and write nothing but their
``progress`` entries (one dict item per stage, replaced whole).

A client may name its request with a progress id (``submit(request, tag)``; the API's
``X-Progress-Id`` header); ``progress(tag)`` then says where that request is: waiting (and how
many jobs are ahead of it), or running with each stage's (done, total), the numbers the command
line's progress bars show. A batch's jobs share their engine call's numbers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..errors import Cancelled, GlmImageError, NonFiniteError, StageDied
from ..request import GenerationRequest
from .errors import ApiError
from .executors import Executor, Watch
from .metrics import Metrics
from .settings import ServerSettings

__all__ = ["ClientGone", "EngineQueue", "Job"]

log = logging.getLogger("glm_image.server")


class ClientGone(Exception):
    """The client disconnected before its result was ready; there is no one to answer."""


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # its client left or its time ran out; read by the stage threads
    tag: str | None = None  # the client's progress id
    # stage -> (done, total) of the engine call running this job; written by the stage threads
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)


class EngineQueue:
    def __init__(self, executor: Executor, settings: ServerSettings, metrics: Metrics) -> None:
        self.executor, self.settings, self.metrics = executor, settings, metrics
        self._waiting: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()
        self._active: set[Job] = set()  # jobs of the engine calls in flight
        self._tagged: dict[str, Job] = {}  # progress id -> its job, until its answer is sent
        self._closing: str | None = None  # why no request is taken any more (a forced shutdown)
        # (height, width, images) -> whether one engine call of that holds in memory; None: any
        self.fits: Callable[[int, int, int], bool] | None = None
        self._slots = [asyncio.Semaphore(stage.slots) for stage in executor.stages]
        # an executor may allow more in flight than its stages' slots (continuous: a DiT backlog)
        in_flight = getattr(executor, "in_flight", sum(stage.slots for stage in executor.stages))
        self._in_flight = asyncio.Semaphore(in_flight)
        metrics.declare_stages(stage.name for stage in executor.stages)

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Jobs in the engine calls now in flight."""
        return len(self._active)

    async def start(self) -> None:
        await self.executor.start()
        self._task = asyncio.create_task(self._work(), name="glm-image-engine-worker")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._calls) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        closing = ApiError("unavailable", "the server is shutting down")
        for job in [*self._waiting, *self._active]:
            if not job.future.done():
                job.future.set_exception(closing)
        self._waiting.clear()
        await self.executor.stop()

    def abort(self, reason: str) -> int:
        """A forced shutdown (a second Ctrl-C): every request not yet answered gets a 503 now,
        queued or running, and every running engine call stops at its next step. Returns how many
        requests were answered so. Later submissions get the same 503."""
        self._closing = reason
        closing = ApiError("unavailable", reason)
        jobs = [*self._waiting, *self._active]
        self._waiting.clear()
        answered = 0
        for job in jobs:
            job.abandoned = True  # read by the stage threads: the engine stops at its next step
            if not job.future.done():
                job.future.set_exception(closing)
                answered += 1
        return answered

    def submit(self, request: GenerationRequest, tag: str | None = None) -> Job:
        """Queue a validated request, or raise 429 when ``max_queue`` jobs already wait.

        ``tag``: the client's progress id (checked by the caller), in use until ``forget(job)``.
        """
        if tag is not None and tag in self._tagged:
            raise ApiError(
                "invalid_value",
                "X-Progress-Id: already names a request in progress; send a new random id",
                param="X-Progress-Id",
            )
        if self._closing is not None:
            raise ApiError("unavailable", self._closing)
        if self.executor.broken is not None:
            raise ApiError("unavailable", f"the server cannot generate: {self.executor.broken}")
        if len(self._waiting) >= self.settings.max_queue:
            raise ApiError(
                "queue_full",
                f"the queue is full ({self.settings.max_queue} requests waiting); retry later",
            )
        job = Job(request, asyncio.get_running_loop().create_future(), tag=tag)
        if tag is not None:
            self._tagged[tag] = job
        self._waiting.append(job)
        self._wakeup.set()
        return job

    def forget(self, job: Job) -> None:
        """The job's answer is sent (or nobody waits for it): its progress id is free again."""
        if job.tag is not None and self._tagged.get(job.tag) is job:
            del self._tagged[job.tag]

    def progress(self, tag: str) -> dict | None:
        """Where the request with progress id ``tag`` is, or None when no such request is here."""
        job = self._tagged.get(tag)
        if job is None:
            return None
        if job.future.done():
            state = "finishing"  # its images are being written
        elif job in self._active:
            state = "running"
        else:
            state = "queued"
        answer: dict = {"id": tag, "state": state}
        if state == "queued":
            answer["ahead"] = next((i for i, j in enumerate(self._waiting) if j is job), 0)
        stages = dict(job.progress)  # one C-level copy: a stage thread may add an item meanwhile
        answer["stages"] = {stage: {"done": d, "total": t} for stage, (d, t) in stages.items()}
        return answer

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
        if first.request.images or getattr(self.executor, "per_request", False):
            return batch  # image-to-image; or an executor that batches by itself (continuous)
        mixes = getattr(self.executor, "mixes_adapters", True)
        for job in list(self._waiting):
            request = job.request
            if (
                request.batch_key == first.request.batch_key
                and (mixes or request.lora == first.request.lora)
                and images + request.num_images <= self.settings.max_batch
                and (
                    self.fits is None or self.fits(request.height, request.width, images + request.num_images)
                )
            ):
                self._waiting.remove(job)
                batch.append(job)
                images += request.num_images
        return batch

    async def _work(self) -> None:
        first = self._slots[0]
        while True:
            while not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._in_flight.acquire()
            await first.acquire()
            if not self._waiting:  # every waiting job left while the first stage was busy
                first.release()
                self._in_flight.release()
                continue
            batch = self._take()
            now = time.perf_counter()
            for job in batch:
                self.metrics.observe("queue_wait", now - job.arrived)
            task = asyncio.create_task(self._call(batch), name="glm-image-engine-call")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[Job]) -> None:
        """A batch taken by the worker, which already holds the first stage's slot for it."""
        try:
            await self._run(batch, holding_first=True)
        finally:
            self._in_flight.release()

    async def _through(self, batch: list[Job], holding_first: bool) -> list:
        """The batch through every stage, each entered when it has a free slot."""

        def abandoned() -> bool:  # read on stage threads too: plain flags, no queue state
            return all(job.abandoned for job in batch)

        def report(stage: str, done: int, total: int) -> None:  # on the stage threads
            for job in batch:
                job.progress[stage] = (done, total)

        work = [job.request for job in batch]
        for index, stage in enumerate(self.executor.stages):
            if index or not holding_first:
                await self._slots[index].acquire()
            try:
                if abandoned():
                    raise Cancelled
                self.metrics.stage_busy(stage.name, True)
                try:
                    work = await stage.run(work, Watch(abandoned, report))
                finally:
                    self.metrics.stage_busy(stage.name, False)
            finally:
                self._slots[index].release()
        return work

    async def _run(self, batch: list[Job], holding_first: bool = False) -> None:
        """One engine call; when a call of several requests raises, each runs again alone."""
        self._active.update(batch)
        try:
            outputs = await self._through(batch, holding_first)
        except Cancelled:
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
            self.metrics.count_engine_call(
                len(batch), outputs[0].timings, graphs=outputs[0].ar_graph_captures
            )
            self.metrics.count_images(sum(len(output.images) for output in outputs))
            for job, output in zip(batch, outputs, strict=True):
                if not job.future.done():
                    job.future.set_result(output)
        finally:
            self._active.difference_update(batch)

    def _fail(self, batch: list[Job], error: Exception) -> None:
        if isinstance(error, ApiError):  # the executor's own answer (e.g. a stage that cannot restart)
            failure = error
        elif isinstance(error, GlmImageError) and not isinstance(error, NonFiniteError):
            # validated before queueing, so rare; still the user's
            failure = ApiError("invalid_value", str(error))
        else:
            error_id = secrets.token_hex(8)
            log.error("engine failure, error id %s", error_id, exc_info=error)
            if isinstance(error, NonFiniteError):
                what = "the engine produced NaN or Inf for this request, so no image was made"
            elif isinstance(error, StageDied):  # a worker or a rank: which, and how it ended
                what = str(error)
            elif _out_of_memory(error):  # planned to fit, so another process took the memory
                what = (
                    "the device ran out of memory on this request (another process may be using it); "
                    "what the request held is freed"
                )
            else:
                what = "the engine failed on this request"
            # issue 30: say what is true next; a stage whose ranks died cannot run again (503s follow)
            broken = self.executor.broken
            after = "the server keeps serving" if broken is None else "the server cannot generate any more"
            failure = ApiError("internal", f"{what} (error id {error_id}); {after}", error_id=error_id)
        for job in batch:
            if not job.future.done():
                job.future.set_exception(failure)


def _out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError)
