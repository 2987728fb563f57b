"""``serve --batching continuous``: the AR runs as an iteration-level scheduler, requests come
and go between its iterations, and each finished request goes on to the DiT at once.

``ContinuousExecutor`` has the queue's two stages (``jobs.EngineQueue``): ``ar`` with
``max_rows`` slots and ``dit`` with one. The queue hands it one request per call
(``per_request``), and every AR call is a ``submit`` to one ``engine.scheduler.ArScheduler``,
driven by a thread of its own: a request that arrives while others decode is prefilled between
two iterations and joins them, and leaves the moment its grid is complete. Its prior tokens then
wait for the DiT, which runs one request at a time on another thread (at 1024x1024 batching the
DiT gains little on a big GPU, and one request at a time is what makes an image its solo
image). On one device the two threads interleave their kernels; the AR stays fed because the
queue admits up to ``max_rows`` requests into the AR while up to ``max_rows`` more wait for or
run in the DiT.

An image's tokens and pixels equal its solo run with its seed (``GlmImage.run``), bit for bit on
a CPU in float32: the scheduler runs each row as its solo run cut into iterations, and the DiT
gets exactly the solo call. A request whose client left or whose time ran out
(``abandoned()``) leaves the scheduler at its next iteration, freeing its slots; its answer (the
queue's 499 or 504) is given once, by the queue.

``/metrics`` adds where the time goes: the rows running in the AR and its ``max_rows``, the AR's
iterations and row-iterations (occupancy = row-iterations / (iterations x max rows)), its busy
seconds, and the requests waiting for the DiT.

A request's LoRA adapters (``serve --lora NAME=PATH``, picked per request) are its own: the
scheduler applies them to its rows alone (which run apart, beside the pooled rows) and its DiT
call carries them, so its image is the one a static call gives it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from ..errors import Cancelled, GlmImageError
from ..stages import DitCall, outputs_of, plan_call
from ..stages.run import ar_arguments, prior_tokens_of
from .executors import HandleRunner, ModelFront, Stage, Watch, start_runners
from .metrics import _number

__all__ = ["BATCHING", "ContinuousExecutor", "check_batching", "continuous_supported", "executor_for"]

log = logging.getLogger("glm_image.server")

BATCHING = ("auto", "continuous", "static")


def continuous_supported(pipe) -> str | None:
    """Why ``pipe`` cannot serve with continuous batching (None: it can). The scheduler drives
    an AR engine in this process; stages in worker processes, on Ray or on several ranks, and
    stages that take turns on the device (offloading) keep static batching."""
    from ..engine.ar_engine import ArEngine

    if not isinstance(getattr(pipe, "ar", None), ArEngine):
        return "the AR stage does not run in this process (worker processes, ranks or Ray)"
    if getattr(pipe, "offload_to", None) is not None:
        return "the stages take turns on the device (offloading)"
    if pipe.ar.model.tp.size > 1:
        return "the AR is tensor parallel"
    if getattr(pipe, "streams", None):
        return "blocks stream from host memory (--residency dit_offload or offload)"
    return None


def check_batching(batching: str) -> None:
    if batching not in BATCHING:
        raise GlmImageError(f"batching = {batching!r}; allowed: {', '.join(BATCHING)}")


def executor_for(pipe, batching: str = "auto", max_rows: int = 16):
    """The executor ``serve --batching`` asks for over a loaded ``pipe``: a
    ``ContinuousExecutor``, or None for the static default (``InProcessExecutor``). ``auto``:
    continuous where ``continuous_supported``; ``continuous`` where it is not is an error."""
    check_batching(batching)
    if batching == "static" or (batching == "auto" and continuous_supported(pipe) is not None):
        return None
    return ContinuousExecutor(pipe, max_rows=max_rows)


class _LocalRows:
    """The AR side of a ``ContinuousExecutor`` in this process: an ``ArScheduler`` over the
    pipeline's AR engine, driven by a thread of its own."""

    def __init__(self, engine, max_rows: int, mode: str | None) -> None:
        from ..engine.scheduler import ArScheduler

        self.engine = engine
        self.scheduler = ArScheduler(engine, max_rows=max_rows, mode=mode)
        self.max_rows, self.mode = self.scheduler.max_rows, self.scheduler.mode
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.broken: str | None = None

    def stats(self):
        return self.scheduler.stats()

    def describe(self) -> dict:
        return {"device": str(self.engine.device), "max_rows": self.max_rows, "rows": self.mode}

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._drive, name="glm-image-ar-scheduler", daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        try:
            self.scheduler.run_forever(self._stop)
        except BaseException as e:  # a fault outside any one request: every request fails, said in /health
            self.broken = f"the AR scheduler stopped ({type(e).__name__})"
            log.error("the AR scheduler stopped", exc_info=e)
            self.scheduler.cancel_all(e)

    async def stop(self) -> None:
        self._stop.set()
        self.scheduler.wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    async def run(self, call, abandoned):
        """``call``'s ``PriorTokens`` once the scheduler has decoded it."""
        loop = asyncio.get_running_loop()
        prompts, kwargs = ar_arguments(self.engine, call)
        answer = loop.create_future()

        def done(ticket) -> None:  # on the scheduler's thread
            loop.call_soon_threadsafe(_settle, answer, ticket)

        start = time.perf_counter()
        self.scheduler.submit(
            prompts,
            call.height,
            call.width,
            abandoned=abandoned,
            on_done=done,
            lora=call.lora,
            progress=abandoned.report if isinstance(abandoned, Watch) else None,  # the page's AR bar
            **kwargs,
        )
        return prior_tokens_of(call, await answer, start)


class ContinuousExecutor:
    """The AR as an ``ArScheduler`` (in this process on a thread of its own, or in a stage worker
    driven by ticks), the DiT one request at a time on its runner."""

    name = "continuous"
    per_request = True  # the queue hands over one request per AR call

    def __init__(self, pipe, *, max_rows: int = 16, mode: str | None = None, runners=None) -> None:
        """``mode``: how the AR's rows run (``ArScheduler``: apart, invariant, batched; None: the
        device's). ``runners``: the (AR, DiT) ``HandleRunner``s of stage workers (``pipe``: their
        ``ModelFront``); None: ``pipe`` is a loaded ``GlmImage`` whose AR runs here."""
        if runners is None:
            why = continuous_supported(pipe)
            if why is not None:
                raise GlmImageError(
                    f"--batching continuous: not available here: {why}; use --batching static"
                )
            self.pipe, self.front = pipe, ModelFront.of(pipe)
            self.rows = _LocalRows(pipe.ar, max_rows, mode)
            self.dit = HandleRunner("dit", pipe.handles[1])
        else:
            from .ticking import TickedRows

            self.pipe = self.front = pipe
            self.rows, self.dit = TickedRows(runners[0], max_rows, mode), runners[1]
        self._runners = tuple(runners) if runners else (self.dit,)  # what it starts and stops
        self.hold_adapters: Callable[[], None] | None = None  # stage workers: run once they are up
        self.stages = (Stage("ar", self._ar, max_rows), Stage("dit", self._dit, 1))
        # requests the queue may hold in flight: max_rows in the AR, as many waiting for the DiT
        self.in_flight = 2 * max_rows + 1
        self._dit_waiting: list = []  # abandoned() of each request done with the AR, not yet in the DiT

    @property
    def broken(self) -> str | None:
        return self.rows.broken or self.dit.broken

    async def start(self) -> None:
        await start_runners(self._runners, self.hold_adapters)
        await self.rows.start()

    async def stop(self) -> None:
        await self.rows.stop()
        await asyncio.gather(*(r.stop() for r in self._runners), return_exceptions=True)

    def describe(self) -> dict:
        if isinstance(self.rows, _LocalRows):
            return {"mode": self.name, **self.rows.describe()}
        return {"mode": self.name, "ar": self.rows.describe(), "dit": self.dit.describe()}

    async def _ar(self, requests: list, abandoned) -> tuple:
        front = self.front
        call = plan_call(requests, front.limits, front.ar_decoding, front.jacobi_window, front.jacobi)
        # the request's adapters per stage (names checked now); the scheduler holds the AR's
        adapters = front.lora.for_requests(requests) if front.lora is not None else {}
        prior = await self.rows.run(dataclasses.replace(call, lora=adapters.get("ar")), abandoned)
        self._dit_waiting.append(abandoned)
        return requests, prior, abandoned, adapters.get("dit")

    async def _dit(self, work: tuple, abandoned) -> list:
        requests, prior, mine, lora = work
        if mine in self._dit_waiting:
            self._dit_waiting.remove(mine)
        first = requests[0]
        made = await self.dit.run(
            DitCall(prior, first.steps, first.guidance, self.front.dit_cache, lora), abandoned
        )
        return outputs_of(requests, prior, made)

    def metrics_text(self) -> str:
        """Prometheus lines: the AR's occupancy and the DiT's queue."""
        stats = self.rows.stats()
        # a request abandoned while it waited for the DiT never enters it: not counted
        self._dit_waiting = [a for a in self._dit_waiting if not a()]
        samples = (
            ("glm_image_ar_running_rows", "gauge", "AR rows (images) decoding now.", stats.running_rows),
            ("glm_image_ar_max_rows", "gauge", "AR row slots (--max-rows).", stats.max_rows),
            (
                "glm_image_ar_waiting_requests",
                "gauge",
                "Requests waiting for an AR slot.",
                stats.queued_requests,
            ),
            ("glm_image_ar_iterations_total", "counter", "AR scheduler iterations.", stats.iterations),
            (
                "glm_image_ar_row_iterations_total",
                "counter",
                "Rows run, summed over AR iterations (occupancy: / iterations / max rows).",
                stats.row_iterations,
            ),
            (
                "glm_image_ar_busy_seconds_total",
                "counter",
                "Seconds the AR scheduler iterated.",
                stats.busy_seconds,
            ),
            (
                "glm_image_dit_queue",
                "gauge",
                "Requests done with the AR, waiting for the DiT.",
                len(self._dit_waiting),
            ),
        )
        lines = []
        for name, kind, text, value in samples:
            lines += [
                f"# HELP {name} {text}",
                f"# TYPE {name} {kind}",
                f"{name} {_number(round(value, 6) if isinstance(value, float) else value)}",
            ]
        return "\n".join(lines) + "\n"


def _settle(answer: asyncio.Future, ticket) -> None:
    if answer.done():  # the call was cancelled meanwhile
        return
    if ticket.error is not None:
        error = ticket.error
        answer.set_exception(Cancelled() if isinstance(error, Cancelled) else error)
    else:
        answer.set_result(ticket.result)
