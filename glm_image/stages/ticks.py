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

from ..errors import reply_of
from .calls import ArCall

__all__ = ["Tick", "Ticked", "tick"]

_SCHEDULERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> _State


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
    stats: object  # the scheduler's ``SchedulerStats`` (its counters since it started)
    mode: str


@dataclass
class _State:
    scheduler: object  # ArScheduler
    dropped: set = field(default_factory=set)
    finished: list = field(default_factory=list)  # (id, ArResult or None, error or None, call, start)
    progress: dict = field(default_factory=dict)


def _state(engine, t: Tick) -> _State:
    """The engine's scheduler and what its ticks share, made by the first tick (one server
    drives a worker: the later ticks ask for the same rows)."""
    state = _SCHEDULERS.get(engine)
    if state is None:
        from ..engine.scheduler import ArScheduler

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
            state.finished.append((request, ticket.result, ticket.error, call, start))

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
            state.finished.append((request, None, e, call, start))
    began = time.perf_counter()
    for _ in range(t.iterations):
        if state.finished or scheduler.idle or time.perf_counter() - began >= t.seconds:
            break
        scheduler.safe_step()
    answered = []
    for request, result, error, call, start in state.finished:
        state.progress.pop(request, None)
        state.dropped.discard(request)
        if error is not None:
            answered.append((request, None, reply_of(error)))
        else:
            answered.append((request, prior_tokens_of(call, result, start), None))
    state.finished = []
    return Ticked(answered, dict(state.progress), scheduler.stats(), scheduler.mode)
