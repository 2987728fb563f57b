"""Continuous batching of an AR that runs behind a handle (``serve --stages separate``): the
scheduler lives with the engine, the server drives it one tick at a time.

A handle runs one call at a time and answers it whole (``ProcessStage``: heartbeats, death,
cancellation, a replaced worker). So the AR worker's ``engine.scheduler.ArScheduler`` is driven
by calls of ``tick`` (a function of the engine, which every handle runs): a ``Tick`` hands over
the requests that arrived since the last one (their ``ArCall``, planned and seeded by the server
as for a static call) and the ids of requests whose clients left, then the scheduler iterates
until a request finishes, ``iterations`` iterations ran or ``seconds`` passed, and the answer
(``Ticked``) carries each finished request's ``PriorTokens`` (or its error, as the handle would
raise it), each running request's progress and the scheduler's numbers. A request that arrives
during a tick joins at the next one: at most ``seconds`` plus one iteration later.

The scheduler is the engine's, kept between ticks (one per engine: a worker serves one server);
a worker that died takes its requests with it, and the server fails them (``StageDied``).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

from ..errors import Cancelled, GlmImageError, NonFiniteError, StageError
from .calls import ArCall

__all__ = ["Tick", "Ticked", "error_of", "reply_of", "tick"]

_SCHEDULERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> _State


def reply_of(error: BaseException) -> tuple[str, str]:
    """(kind, text) of an error on a stage's side, as a handle reports it: "cancelled",
    "nonfinite", "invalid" (a ``GlmImageError``) or "error" (anything else, with its traceback)."""
    import traceback

    if isinstance(error, Cancelled):
        return "cancelled", ""
    if isinstance(error, NonFiniteError):
        return "nonfinite", str(error)
    if isinstance(error, GlmImageError):
        return "invalid", str(error)
    text = "".join(traceback.format_exception(error))
    return "error", f"{type(error).__name__}: {error}\n{text}"


def error_of(kind: str, text: str, where: str) -> BaseException:
    """The error a handle raises for a stage's (kind, text) (``reply_of``); ``where`` names the
    stage (and rank) for an unexpected error."""
    if kind == "cancelled":
        return Cancelled(text or f"{where}: the call was stopped")
    if kind == "nonfinite":
        return NonFiniteError(text)
    if kind == "invalid":
        return GlmImageError(text)
    return StageError(f"{where}: {text}")


@dataclass(frozen=True)
class Tick:
    """One tick of the engine's scheduler (see the module docstring)."""

    max_rows: int
    mode: str | None = None  # the scheduler's rows (``ArScheduler``): None, the device's default
    submit: tuple[tuple[int, ArCall], ...] = ()  # (id, call) of each request that arrived
    drop: tuple[int, ...] = ()  # ids of requests whose clients left
    iterations: int = 16
    seconds: float = 0.05


@dataclass
class Ticked:
    """What a tick answers."""

    done: list[tuple[int, object, tuple[str, str] | None]]  # (id, PriorTokens or None, error reply)
    progress: dict[int, tuple[int, int]]  # id -> (tokens per image written, per image in all)
    running_rows: int
    queued_requests: int
    iterations: int  # the scheduler's, since it started
    row_iterations: int
    busy_seconds: float
    mode: str


@dataclass
class _State:
    scheduler: object  # ArScheduler
    dropped: set = field(default_factory=set)
    finished: list = field(default_factory=list)  # (id, ticket, call, start)
    progress: dict = field(default_factory=dict)


def _state(engine, t: Tick) -> _State:
    state = _SCHEDULERS.get(engine)
    if state is None or state.scheduler.max_rows != t.max_rows:
        from ..engine.scheduler import ArScheduler

        if state is not None:
            state.scheduler.cancel_all(Cancelled("the scheduler was replaced"))
        state = _SCHEDULERS[engine] = _State(ArScheduler(engine, max_rows=t.max_rows, mode=t.mode))
    return state


def tick(t: Tick, engine) -> Ticked:
    """One tick of ``engine``'s scheduler (made by the first tick): submit, drop, iterate, answer."""
    from .run import ar_arguments, prior_tokens_of

    state = _state(engine, t)
    scheduler = state.scheduler
    state.dropped.update(t.drop)
    for request, call in t.submit:
        start = time.perf_counter()

        def done(ticket, request=request, call=call, start=start) -> None:
            state.finished.append((request, ticket, call, start))

        def progress(stage, written, total, request=request) -> None:
            state.progress[request] = (written, total)

        try:
            prompts, kwargs = ar_arguments(engine, call)
            scheduler.submit(
                prompts,
                call.height,
                call.width,
                abandoned=lambda request=request: request in state.dropped,
                on_done=done,
                lora=call.lora,
                progress=progress,
                **kwargs,
            )
        except Exception as e:  # a request the scheduler refuses fails alone
            state.finished.append((request, e, call, start))
    began, ran = time.perf_counter(), 0
    while not state.finished and not scheduler.idle:
        if ran >= t.iterations or time.perf_counter() - began >= t.seconds:
            break
        try:
            scheduler.step()
        except Exception as e:  # a fault outside any one row: the requests in flight fail with it
            scheduler.cancel_all(e)
        ran += 1
    answered = []
    for request, ticket, call, start in state.finished:
        state.progress.pop(request, None)
        state.dropped.discard(request)
        error = ticket if isinstance(ticket, BaseException) else ticket.error
        if error is not None:
            answered.append((request, None, reply_of(error)))
        else:
            answered.append((request, prior_tokens_of(call, ticket.result, start), None))
    state.finished = []
    stats = scheduler.stats()
    return Ticked(
        answered,
        dict(state.progress),
        stats.running_rows,
        stats.queued_requests,
        stats.iterations,
        stats.row_iterations,
        stats.busy_seconds,
        scheduler.mode,
    )
