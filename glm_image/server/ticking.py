"""The continuous-batching AR of a stage worker (``serve --stages separate --batching
continuous``), driven from the server one tick at a time (``stages.ticks``).

``TickedRows`` is the AR side of a ``continuous.ContinuousExecutor`` whose AR runs behind a
``HandleRunner``: a task of the server's event loop sends the worker's scheduler a ``Tick`` with
the requests that arrived and the ids of those whose clients left, and hands out what the answer
carries: each finished request's ``PriorTokens`` (or its error), each running request's AR
progress (the page's bar), the scheduler's numbers for ``/metrics``. While the worker has rows
running, ticks follow each other; with none, the task waits for a request.

A worker that dies fails the requests it held (the runner's ``StageDied``: a 500 naming it) and
the runner starts a new one; requests not yet handed over go to the new worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging

from ..engine.scheduler import SchedulerStats, check_max_rows
from ..errors import Cancelled, error_of
from ..stages.ticks import Tick, tick

__all__ = ["TickedRows"]

log = logging.getLogger("glm_image.server")


def _never() -> bool:
    return False


class TickedRows:
    """An AR scheduler in a stage worker, behind ``runner`` (see the module docstring)."""

    def __init__(self, runner, max_rows: int, mode: str | None = None) -> None:
        check_max_rows(max_rows)
        # what every tick asks for (a new worker's scheduler too), and what the worker's reported
        self.runner, self.max_rows, self.asked, self.mode = runner, max_rows, mode, mode
        self._ids = itertools.count()
        self._pending: list[tuple[int, object]] = []  # (id, ArCall) not yet handed over
        self._futures: dict[int, tuple[asyncio.Future, object]] = {}  # id -> (answer, abandoned)
        self._sent: set[int] = set()  # ids the worker holds
        self._dropped: set[int] = set()  # ids the worker was told to drop
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stats = SchedulerStats(max_rows, 0, 0, 0, 0, 0.0)
        # the counters of the workers before this one (a replaced worker's scheduler starts at 0):
        # /metrics' counters never go back
        self._before = self._last = (0, 0, 0.0)

    @property
    def broken(self) -> str | None:
        return self.runner.broken

    def stats(self) -> SchedulerStats:
        return self._stats

    def describe(self) -> dict:
        return {**self.runner.describe(), "max_rows": self.max_rows, "rows": self.mode or "the device's"}

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._drive())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail(set(self._futures), Cancelled("the server is stopping"))

    async def run(self, call, abandoned):
        """``call``'s ``PriorTokens`` once the worker's scheduler has decoded it."""
        request = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._futures[request] = (answer, abandoned)
        self._pending.append((request, call))
        self._wake.set()
        try:
            return await answer
        finally:  # answered, or given up (the next tick tells the worker to drop it)
            self._futures.pop(request, None)

    async def _drive(self) -> None:
        while True:
            gone = {r for r in self._sent - self._dropped if r not in self._futures or self._futures[r][1]()}
            if not self._pending and not self._sent:
                self._wake.clear()
                await self._wake.wait()
                continue
            submit, self._pending = tuple(self._pending), []
            self._sent.update(r for r, _ in submit)
            self._dropped |= gone
            order = Tick(self.max_rows, self.asked, submit, tuple(sorted(gone)))
            try:
                answer = await self.runner.run(functools.partial(tick, order), _never)
            except Exception as e:  # the worker died (a new one starts) or cannot run: its requests fail
                log.error("the AR scheduler's tick failed: %s", e)
                self._fail(self._sent, e)
                self._sent.clear()
                self._dropped.clear()
                continue
            self._answer(answer)

    def _answer(self, answer) -> None:
        for request, prior, reply in answer.done:
            self._sent.discard(request)
            self._dropped.discard(request)
            if request not in self._futures:
                continue  # given up meanwhile
            future = self._futures[request][0]
            if future.done():
                continue
            if reply is None:
                future.set_result(prior)
            else:
                future.set_exception(error_of(*reply, "the ar stage's worker"))
        for request, (done, total) in answer.progress.items():
            watch = self._futures.get(request, (None, None))[1]
            report = getattr(watch, "report", None)
            if report is not None:
                report("ar", done, total)
        self.mode, worker = answer.mode, answer.stats
        counters = (worker.iterations, worker.row_iterations, worker.busy_seconds)
        if counters[0] < self._last[0]:  # a new worker's scheduler: count on from the old one's
            self._before = tuple(b + last for b, last in zip(self._before, self._last, strict=True))
        self._last = counters
        iterations, row_iterations, busy = (b + c for b, c in zip(self._before, counters, strict=True))
        self._stats = dataclasses.replace(
            worker,
            queued_requests=worker.queued_requests + len(self._pending),
            iterations=iterations,
            row_iterations=row_iterations,
            busy_seconds=busy,
        )

    def _fail(self, requests, error: BaseException) -> None:
        for request in list(requests):
            future = self._futures.get(request, (None, None))[0]
            if future is not None and not future.done():
                future.set_exception(error)
