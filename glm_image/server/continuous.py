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
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import Cancelled, GlmImageError
from ..stages import DitCall, outputs_of, plan_call
from ..stages.run import ar_arguments, prior_tokens_of
from .executors import ModelFront, Stage, Watch, _stop_when
from .metrics import _number

__all__ = ["BATCHING", "ContinuousExecutor", "continuous_supported", "executor_for"]

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


def executor_for(pipe, batching: str = "auto", max_rows: int = 16):
    """The executor ``serve --batching`` asks for over a loaded ``pipe``: a
    ``ContinuousExecutor``, or None for the static default (``InProcessExecutor``). ``auto``:
    continuous where ``continuous_supported``; ``continuous`` where it is not is an error."""
    if batching not in BATCHING:
        raise GlmImageError(f"batching = {batching!r}; allowed: {', '.join(BATCHING)}")
    if batching == "static" or (batching == "auto" and continuous_supported(pipe) is not None):
        return None
    return ContinuousExecutor(pipe, max_rows=max_rows)


class ContinuousExecutor:
    """The AR as an ``ArScheduler`` on its own thread, the DiT one request at a time on another."""

    name = "continuous"
    per_request = True  # the queue hands over one request per AR call

    def __init__(self, pipe, *, max_rows: int = 16, mode: str | None = None) -> None:
        """``mode``: how the AR's rows run (``ArScheduler``: apart, invariant, batched; None: the device's)."""
        why = continuous_supported(pipe)
        if why is not None:
            raise GlmImageError(f"--batching continuous: not available here: {why}; use --batching static")
        from ..engine.scheduler import ArScheduler

        self.pipe, self.front = pipe, ModelFront.of(pipe)
        self.scheduler = ArScheduler(pipe.ar, max_rows=max_rows, mode=mode)
        self.stages = (Stage("ar", self._ar, max_rows), Stage("dit", self._dit, 1))
        # requests the queue may hold in flight: max_rows in the AR, as many waiting for the DiT
        self.in_flight = 2 * max_rows + 1
        self._dit_waiting: list = []  # abandoned() of each request done with the AR, not yet in the DiT
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dit_thread: ThreadPoolExecutor | None = None
        self._died: str | None = None

    @property
    def broken(self) -> str | None:
        return self._died

    async def start(self) -> None:
        self._dit_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm-image-dit")
        self._thread = threading.Thread(target=self._drive, name="glm-image-ar-scheduler", daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        try:
            self.scheduler.run_forever(self._stop)
        except BaseException as e:  # a fault outside any one request: every request fails, said in /health
            self._died = f"the AR scheduler stopped ({type(e).__name__})"
            log.error("the AR scheduler stopped", exc_info=e)
            self.scheduler.cancel_all(e)

    async def stop(self) -> None:
        self._stop.set()
        self.scheduler.wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        if self._dit_thread is not None:
            self._dit_thread.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict:
        return {
            "mode": self.name,
            "device": str(getattr(self.pipe, "device", "")),
            "max_rows": self.scheduler.max_rows,
            "rows": self.scheduler.mode,
        }

    async def _ar(self, requests: list, abandoned) -> tuple:
        front, loop = self.front, asyncio.get_running_loop()
        call = plan_call(requests, front.limits, front.ar_decoding, front.jacobi_window, front.jacobi)
        prompts, kwargs = ar_arguments(self.pipe.ar, call)
        # the request's adapters per stage (names checked now); the scheduler holds the AR's
        adapters = front.lora.for_requests(requests) if front.lora is not None else {}
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
            lora=adapters.get("ar"),
            progress=abandoned.report if isinstance(abandoned, Watch) else None,  # the page's AR bar
            **kwargs,
        )
        result = await answer
        self._dit_waiting.append(abandoned)
        return requests, prior_tokens_of(call, result, start), abandoned, adapters.get("dit")

    async def _dit(self, work: tuple, abandoned) -> list:
        requests, prior, mine, lora = work
        if mine in self._dit_waiting:
            self._dit_waiting.remove(mine)
        first = requests[0]
        call = DitCall(prior, first.steps, first.guidance, self.front.dit_cache, lora)
        dit = self.pipe.handles[1]
        loop = asyncio.get_running_loop()
        made = await loop.run_in_executor(self._dit_thread, dit.run, call, _stop_when(abandoned))
        return outputs_of(requests, prior, made)

    def metrics_text(self) -> str:
        """Prometheus lines: the AR's occupancy and the DiT's queue."""
        stats = self.scheduler.stats()
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
