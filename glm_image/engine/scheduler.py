"""Continuous batching of the AR: requests join and leave the running decode between iterations.

``ArScheduler`` holds a pool of ``max_rows`` row slots over one ``ArEngine``. A request
(``submit``: the arguments of ``ArEngine.generate``) waits in a queue until a slot is free; its
prompt is planned and prefilled *between* decode iterations, and its rows then take part in
every later iteration until their grids are complete, when the request's ``ArTicket`` gets its
``ArResult`` at once (the server hands it to the DiT while the other rows go on). A request that
is abandoned (``abandoned()`` true: its client left, its time ran out) leaves at the next
iteration and frees its slots. Each image row is one slot; a request of several images takes
as many slots as are free and queues the rest.

Exactness: an image's tokens do not depend on what ran with it or when it joined, because a row
is exactly its solo run, cut into iterations. Each row has its own prompt (unpadded), its own KV
cache of its solo capacity, its own seeded generator and noise stream, and runs the very
functions of the solo path (``decode.start_sequential`` + ``DecodeLoop.eager_step``;
``jacobi.start`` + ``JacobiLoop.iterate``): so on a CPU in float32 its tokens equal
``ArEngine.generate`` with its seed bit for bit (the engine's default there decodes rows apart
too, see ``ar_engine``'s docstring on batch invariance). What the scheduler changes is *when*
rows run: a short request does not wait for a long batch to end, and a finished image leaves
while the others decode. Rows of any size, text-to-image beside image-to-image, sequential
beside Jacobi rows (each its own window and accepted counts) run in the same iterations.

How a row's forward runs (``mode``): ``apart``, one forward per row as above; ``invariant``,
the sequential rows of an iteration in ONE forward over a shared KV pool (``engine.row_pool``:
each row its own position, slot and visibility) whose products are each row's own one-row
product and whose attention is each row's solo call (``engine.rows``): bit for bit ``apart``,
checked on the engine's weights first (the default where the engine decodes rows apart: a CPU,
or ``batch_invariant=True``; ``apart`` where the check fails); ``batched``, the same pool with
GEMMs shared by the rows (the default on an accelerator, where batching is the throughput).
Batched rows keep their solo distribution and seeds but not their solo bits: a GEMM of n rows
rounds a row differently, and sampling turns that into another token now and then (greedy rows
give the solo tokens unless logits tie). Jacobi rows, and rows with LoRA adapters (``submit``'s
``lora``: each row its own selection), always run apart. A prefill runs between
two iterations, one per iteration; in ``batched`` mode a prompt longer than ``prefill_chunk``
(an edit's condition image) runs in chunks, one per iteration, while the other rows decode
(``decode.start_sequential_chunked``: a chunk's GEMMs change the row's last bits, so the exact
modes prefill whole). On a device with graphs, ``batched`` steps replay a graph per bucket of
running rows (``row_pool.ROW_BUCKETS``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import Cancelled, GlmImageError
from ..progress import Progress
from ..sampling import image_seeds
from . import jacobi
from .choices import DEFAULT_CONTINUED, DEFAULT_COUPLED, DEFAULT_DRAFTS, DEFAULT_WINDOW, check_decoding
from .decode import DecodeStats, start_sequential, start_sequential_chunked
from .protocol import upsample_grid

__all__ = ["MODES", "ArScheduler", "ArTicket", "SchedulerStats", "check_max_rows"]

_log = logging.getLogger(__name__)

MODES = ("apart", "invariant", "batched")
# tokens per chunk of a long prompt's prefill in ``batched`` mode: an edit's 1024x1024 condition
# image (4096 tokens) takes 8 iterations, each about a 512-token forward beside the decoding rows
PREFILL_CHUNK = 512


@dataclass(eq=False)
class ArTicket:
    """One submitted request: its arguments, its rows' progress, then its result or error."""

    prompts: list[str]
    height: int
    width: int
    seeds: int | Sequence[int] | None
    options: dict
    abandoned: Callable[[], bool]
    on_done: Callable[[ArTicket], None] | None
    progress: Progress | None = None  # ("ar", tokens done per image, tokens per image), per iteration
    submitted: float = field(default_factory=time.perf_counter)
    # filled on the scheduler's thread
    rows: list = field(default_factory=list)  # the planned batch's rows, not yet admitted
    parts: list = field(default_factory=list)  # per row: (tokens (1, steps), DecodeStats) when done
    plan: tuple | None = None  # (spec, conditions, seeds, steps, each row's adapters)
    running: int = 0
    admitted: float | None = None  # when its first row's prefill began
    prefill_done: float | None = None
    finished: float | None = None
    result: object = None  # ArResult
    error: BaseException | None = None
    reported: int = 0  # the tokens per image last given to ``progress``
    _event: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None):
        """The ``ArResult`` (blocks); raises the request's error (``Cancelled`` if abandoned)."""
        if not self._event.wait(timeout):
            raise TimeoutError("the AR scheduler did not finish the request in time")
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _Row:
    ticket: ArTicket
    index: int  # the row's index in its request
    loop: object  # DecodeLoop | JacobiLoop
    steps: object  # the iterator: one forward per next() (None: a pooled row)
    sequential: bool
    pooled: bool = False  # decoded in the ``RowPool``'s batched forward
    next_step: int = 0  # pooled: the step its next forward writes
    prefill: object = None  # a chunked prefill under way (``decode.start_sequential_chunked``)
    lora: tuple = ()  # the row's adapters, ((name, scale), ...); a row with any runs apart
    done: int = 0  # a row stepped apart: tokens written so far (its prefill writes the first)

    @property
    def written(self) -> int:
        """Tokens the row has written (a pooled row: the step its next forward writes)."""
        return self.next_step if self.pooled else self.done


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for ``/metrics`` and benchmarks."""

    max_rows: int
    running_rows: int
    queued_requests: int
    iterations: int
    row_iterations: int  # rows run, summed over iterations: occupancy = this / (iterations * max_rows)
    busy_seconds: float


class ArScheduler:
    """Iteration-level scheduling of one ``ArEngine``'s rows (see the module docstring).

    Drive it with ``run_forever`` on a thread of its own (the server) or with ``run_until_idle``
    (one caller); ``submit`` may be called from any thread.
    """

    def __init__(
        self,
        engine,
        *,
        max_rows: int = 16,
        max_queued: int | None = None,
        mode: str | None = None,
        prefill_chunk: int | None = None,
    ) -> None:
        """``mode``: ``apart``, ``invariant`` or ``batched`` (module docstring); None: where the
        engine decodes rows apart (``ArEngine.rows_apart``: a CPU by default) ``invariant`` if
        ``rows.check_rows`` passes on this engine's weights, else ``apart``; elsewhere ``batched``.
        ``invariant`` asked for where the check fails is an error that says why.

        ``prefill_chunk``: a sequential row's prompt longer than this is prefilled in chunks of
        this many tokens, one per iteration, while the other rows decode (``batched`` mode only: a
        chunk's GEMMs change a row's bits, which the exact modes keep); None: ``PREFILL_CHUNK``
        in ``batched`` mode, whole prefills otherwise."""
        if mode is not None and mode not in MODES:
            raise GlmImageError(f"mode = {mode!r}; allowed: {', '.join(MODES)} or None (auto)")
        check_max_rows(max_rows)
        if max_queued is not None and (not isinstance(max_queued, int) or max_queued < 0):
            raise GlmImageError(f"max_queued = {max_queued!r}; allowed: an integer >= 0, or None (no limit)")
        self.engine, self.max_rows, self.max_queued = engine, max_rows, max_queued
        self.mode = mode or ("invariant" if engine.rows_apart else "batched")
        self._pool = None
        if self.mode != "apart":
            from .row_pool import RowPool

            invariant = self.mode == "invariant"
            self._pool = RowPool(engine, max_rows, invariant=invariant)
            why = self._pool.check() if invariant else None
            if why is not None and mode == "invariant":
                raise GlmImageError(f"mode = 'invariant' is not exact on {engine.device}: {why}")
            if why is not None:  # the default: rows apart are exact everywhere
                _log.info("AR scheduler: rows decode apart (%s)", why)
                self.mode, self._pool = "apart", None
        if prefill_chunk is not None:
            if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
                raise GlmImageError(f"prefill_chunk = {prefill_chunk!r}; allowed: an integer >= 1, or None")
            if self.mode != "batched":
                raise GlmImageError(
                    f"prefill_chunk = {prefill_chunk}: needs mode 'batched' (this scheduler's is "
                    f"{self.mode!r}, whose rows keep their solo bits; a chunked prefill changes them)"
                )
        self.prefill_chunk = prefill_chunk or (PREFILL_CHUNK if self.mode == "batched" else None)
        self._queue: deque[ArTicket] = deque()  # requests with rows not yet admitted
        self._running: list[_Row] = []
        self._cv = threading.Condition()
        self.iterations = self.row_iterations = 0
        self.busy_seconds = 0.0

    # ---------------------------------------------------------------- requests

    def submit(
        self,
        prompts: str | Sequence[str],
        height: int,
        width: int,
        *,
        seeds: int | Sequence[int] | None = None,
        abandoned: Callable[[], bool] | None = None,
        on_done: Callable[[ArTicket], None] | None = None,
        greedy: bool | None = None,
        constrain_grid: bool = True,
        num_images_per_prompt: int = 1,
        include_eos: bool = False,
        max_new_tokens: int | None = None,
        images: Sequence[Sequence] | None = None,
        decoding: str = "sequential",
        jacobi_window: int = DEFAULT_WINDOW,
        jacobi_drafts: str = DEFAULT_DRAFTS,
        jacobi_coupled: bool = DEFAULT_COUPLED,
        jacobi_continued: bool = DEFAULT_CONTINUED,
        lora=None,
        progress: Progress | None = None,
    ) -> ArTicket:
        """Queue a request (checked here, before any work); its result equals
        ``engine.generate`` with the same arguments. ``on_done(ticket)`` is called on the
        scheduler's thread when it has a result or an error. ``lora``: the request's adapters
        (a ``lora.StageLora``: one selection for every image, or one per image), held on the
        engine when the request is planned; its rows run apart, each with its own selection
        (what ``engine.generate`` inside ``lora.applied`` gives), beside the pooled rows.
        ``progress("ar", done, total)``: after each iteration in which the request's tokens
        advanced, on the scheduler's thread, its images' mean tokens written (as
        ``engine.generate`` reports a batch); an exception from it fails the request."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise GlmImageError("prompts: need at least one prompt")
        if num_images_per_prompt < 1:
            raise GlmImageError(f"num_images_per_prompt = {num_images_per_prompt} must be >= 1")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise GlmImageError(f"max_new_tokens = {max_new_tokens} must be >= 1")
        check_decoding(decoding, jacobi_window, jacobi_drafts, jacobi_coupled, jacobi_continued)
        self.engine.config.size_limits.check_size(height, width)
        if images is not None and len(images) != len(prompts):
            raise GlmImageError(
                f"images: {len(images)} image lists for {len(prompts)} prompts; need one per prompt"
            )
        image_seeds(seeds, len(prompts) * num_images_per_prompt)  # a bad seed fails here, not later
        _check_lora(lora, len(prompts) * num_images_per_prompt)
        options = {
            "greedy": greedy,
            "constrain_grid": constrain_grid,
            "num_images_per_prompt": num_images_per_prompt,
            "include_eos": include_eos,
            "max_new_tokens": max_new_tokens,
            "images": images,
            "decoding": decoding,
            "jacobi": jacobi.JacobiOptions(jacobi_window, jacobi_drafts, jacobi_coupled, jacobi_continued),
            "lora": lora,
        }
        ticket = ArTicket(
            prompts, height, width, seeds, options, abandoned or (lambda: False), on_done, progress
        )
        with self._cv:
            if self.max_queued is not None and len(self._queue) >= self.max_queued:
                raise GlmImageError(
                    f"the AR scheduler's queue is full ({self.max_queued} requests waiting); retry later"
                )
            self._queue.append(ticket)
            self._cv.notify_all()
        return ticket

    def stats(self) -> SchedulerStats:
        with self._cv:
            return SchedulerStats(
                self.max_rows,
                len(self._running),
                len(self._queue),
                self.iterations,
                self.row_iterations,
                self.busy_seconds,
            )

    @property
    def idle(self) -> bool:
        with self._cv:
            return not self._queue and not self._running

    # ---------------------------------------------------------------- driving

    def run_until_idle(self) -> None:
        """Iterate until every submitted request is done (or failed)."""
        while not self.idle:
            self.step()

    def run_forever(self, stop: threading.Event, poll: float = 0.05) -> None:
        """Iterate while there is work; wait for ``submit`` otherwise; return once ``stop`` is set
        (requests still running are cancelled)."""
        while not stop.is_set():
            with self._cv:
                if not self._queue and not self._running:
                    self._cv.wait(poll)
                    continue
            self.safe_step()
        self.cancel_all(Cancelled())

    def safe_step(self) -> None:
        """``step``; a fault outside any one row fails the requests in flight with it (the
        scheduler goes on with the next ones)."""
        try:
            self.step()
        except Exception as e:
            self.cancel_all(e)

    def wake(self) -> None:
        """Have ``run_forever`` look again now (e.g. after a request was abandoned)."""
        with self._cv:
            self._cv.notify_all()

    def cancel_all(self, error: BaseException) -> None:
        with self._cv:
            rows, tickets = self._running, {row.ticket for row in self._running} | set(self._queue)
            self._running, self._queue = [], deque()
        self._close_rows(rows)
        for ticket in tickets:
            self._finish(ticket, error=error)

    # ---------------------------------------------------------------- one iteration

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: drop abandoned requests, prefill one waiting row if a slot is free,
        then one forward of every other running row; finished requests get their result."""
        began = time.perf_counter()
        self._drop_abandoned()
        joined = self._admit()
        ran = 0 if joined is None else 1
        to_pool = [joined] if joined is not None and joined.pooled else []
        for row in list(self._running):
            if row is joined or row.pooled:
                continue
            ran += 1
            try:
                with self._adapters(row.lora):
                    if row.prefill is not None:
                        if self._prefill_step(row) and row.pooled:
                            to_pool.append(row)
                        continue
                    next(row.steps)
                    row.done += row.sequential  # a Jacobi row counts through its loop's progress
            except StopIteration:
                self._row_done(row)
            except Exception as e:  # the request fails alone; the other rows go on
                self._fail(row.ticket, e)
        if self._pool is not None and self._pool.rows:
            ran += len(self._pool.rows)
            try:
                done, failed = self._pool.step()
            except Exception as e:  # one forward of every pooled row: they fail together
                done, failed = [], [(row, e) for row in self._pool.rows]
            for row, error in failed:  # a row's own fault (its sampling) fails its request alone
                self._fail(row.ticket, error)
            for row in done:
                if row in self._running:  # not a request that failed in this iteration
                    self._row_done(row)
        for row in to_pool:
            if row in self._running:
                self._pool.join(row)  # decodes from the next iteration on
        self._report()
        with self._cv:
            self.iterations += 1
            self.row_iterations += ran
            self.busy_seconds += time.perf_counter() - began

    def _report(self) -> None:
        """Each running request's progress, where it advanced: its images' mean tokens written."""
        mine: dict[ArTicket, list[_Row]] = {}
        for row in self._running:
            if row.ticket.progress is not None:
                mine.setdefault(row.ticket, []).append(row)
        for ticket, rows in mine.items():
            steps = ticket.plan[3]
            finished = sum(steps for part in ticket.parts if part is not None)
            self._tell(ticket, (finished + sum(min(r.written, steps) for r in rows)) // len(ticket.parts))

    def _tell(self, ticket: ArTicket, done: int) -> bool:
        """``ticket.progress("ar", done, steps)`` if ``done`` is news; False if it raised (the
        request then fails with its error)."""
        if ticket.progress is None or done <= ticket.reported:
            return True
        ticket.reported = done
        try:
            ticket.progress("ar", done, ticket.plan[3])
        except Exception as e:
            self._fail(ticket, e)
            return False
        return True

    def _drop_abandoned(self) -> None:
        with self._cv:
            gone = {t for t in [*self._queue, *(r.ticket for r in self._running)] if t.abandoned()}
        for ticket in gone:
            self._fail(ticket, Cancelled())

    def _admit(self) -> _Row | None:
        """Prefill the next waiting row, if a slot is free: its prefill is its forward of this
        iteration. A request is planned (tokenized, its images encoded) when it first gets a slot."""
        with self._cv:
            if len(self._running) >= self.max_rows or not self._queue:
                return None
            ticket = self._queue[0]
        try:
            if ticket.plan is None:
                self._plan(ticket)
            index = len(ticket.parts) - len(ticket.rows)
            batch = ticket.rows.pop(0)
            with self._cv:
                if not ticket.rows and self._queue and self._queue[0] is ticket:
                    self._queue.popleft()
            row = self._start(ticket, batch, index)
        except Exception as e:
            self._fail(ticket, e)
            return None
        with self._cv:
            self._running.append(row)
        ticket.running += 1
        return row

    def _plan(self, ticket: ArTicket) -> None:
        engine, options = self.engine, ticket.options
        ticket.admitted = time.perf_counter()
        batch, spec, conditions = engine._plan(ticket.prompts, ticket.height, ticket.width, options["images"])
        n = options["num_images_per_prompt"]
        if n > 1:
            batch = batch.repeat_rows(n)
            if conditions is not None:
                conditions = [c for c in conditions for _ in range(n)]
        rows = batch.input_ids.shape[0]
        seeds = image_seeds(ticket.seeds, rows)
        steps = spec.num_tokens + (1 if options["include_eos"] else 0)
        if options["max_new_tokens"] is not None:
            steps = min(steps, options["max_new_tokens"])
        ticket.plan = (spec, conditions, seeds, steps, self._hold(options["lora"], rows))
        # a request of one row is its batch (no padding); several: each row alone (``_Batch.row``)
        ticket.rows = [batch] if rows == 1 else [batch.row(i) for i in range(rows)]
        ticket.parts = [None] * rows

    def _hold(self, lora, rows: int) -> list[tuple]:
        """Each row's adapters (() for none), the request's adapters held on the engine's model
        (read from their sources on first use, as ``lora.applied`` does)."""
        if lora is None:
            return [()] * rows
        from ..lora.stage import held

        held(self.engine, "ar", lora).check(lora.selection)
        chosen = lora.selection if isinstance(lora.selection, list) else [lora.selection] * rows
        return [tuple(row) for row in chosen]

    def _adapters(self, selection: tuple):
        """Within the block the model's forwards apply ``selection`` (nothing for ())."""
        if not selection:
            return contextlib.nullcontext()
        from ..lora.apply import LoraSet

        return LoraSet.of(self.engine.model).selected(selection)

    def _start(self, ticket: ArTicket, batch, index: int) -> _Row:
        """The row's prefill (with its adapters): its forward of this iteration."""
        with self._adapters(ticket.plan[4][index]):
            return self._start_row(ticket, batch, index)

    def _start_row(self, ticket: ArTicket, batch, index: int) -> _Row:
        engine, options = self.engine, ticket.options
        spec, _, seeds, steps, adapters = ticket.plan
        generators = [torch.Generator(engine.device).manual_seed(seeds[index])]
        greedy = engine.greedy_default if options["greedy"] is None else options["greedy"]
        constrain = options["constrain_grid"]
        if options["decoding"] == "jacobi":
            o = options["jacobi"]
            window = jacobi.JacobiOptions(min(o.window, steps), o.drafts, o.coupled, o.continued)
            loop, done = jacobi.start(engine, batch, spec, steps, generators, greedy, constrain, window)
            if ticket.prefill_done is None:
                ticket.prefill_done = done
            row = _Row(ticket, index, loop, None, False, lora=adapters[index], done=1)
            row.steps = loop.iterate(lambda stage, written, total: setattr(row, "done", written))
            return row
        row = _Row(ticket, index, None, None, True, lora=adapters[index])
        if self.prefill_chunk is not None and batch.input_ids.shape[1] > self.prefill_chunk:
            row.prefill = start_sequential_chunked(
                engine, batch, steps, generators, greedy, constrain, self.prefill_chunk
            )
            self._prefill_step(row)  # its first chunk is its forward of this iteration
        else:
            row.loop, done = start_sequential(engine, batch, steps, generators, greedy, constrain)
            self._decode_next(row, done)
        return row

    def _decode_next(self, row: _Row, prefill_done: float) -> None:
        """A sequential row whose prefill is done: pooled (it joins the pool at the end of this
        iteration) or stepped apart."""
        loop, steps, ticket = row.loop, row.ticket.plan[3], row.ticket
        row.done = 1
        if self._pool is not None and steps > 1 and not row.lora:
            row.pooled = True
        else:
            row.steps = (loop.eager_step(s) for s in range(1, steps))
        if ticket.prefill_done is None:
            ticket.prefill_done = prefill_done

    def _prefill_step(self, row: _Row) -> bool:
        """One chunk of the row's prefill; True when that was the last (the row then decodes)."""
        try:
            next(row.prefill)
            return False
        except StopIteration as stop:
            row.prefill = None
            row.loop, done = stop.value
            self._decode_next(row, done)
            return True

    def _row_done(self, row: _Row) -> None:
        ticket, loop = row.ticket, row.loop
        steps = ticket.plan[3]
        if row.pooled and row in self._pool.rows:
            self._pool.leave(row)
        if row.sequential:
            if loop.noise is not None:
                loop.noise.close()
            stats = DecodeStats("sequential", steps, (steps,), steps)
            ticket.parts[row.index] = (loop.tokens, stats)
        else:
            ticket.parts[row.index] = (loop.result(), loop.stats())
        with self._cv:
            self._running.remove(row)
        ticket.running -= 1
        if ticket.running == 0 and not ticket.rows and self._tell(ticket, steps):
            self._complete(ticket)

    def _complete(self, ticket: ArTicket) -> None:
        """The request's ``ArResult``, as ``ArEngine.generate`` puts it together."""
        from .ar_engine import ArResult

        engine = self.engine
        spec, conditions, seeds, steps, _ = ticket.plan
        tokens = torch.cat([p[0] for p in ticket.parts])
        stats = DecodeStats.together([p[1] for p in ticket.parts])
        end = spec.target_offset + spec.target[0] * spec.target[1]
        target = tokens[:, spec.target_offset : end]
        whole = steps >= end and bool((target < engine.num_codes).all())
        prior = upsample_grid(target, *spec.target) if whole else None
        prefill = ticket.prefill_done - ticket.admitted
        result = ArResult(tokens, prior, spec, seeds, None, conditions, prefill, "eager", stats)
        self._finish(ticket, result=result)

    def _close_rows(self, rows: list[_Row]) -> None:
        for row in rows:
            if row.pooled and row in self._pool.rows:
                self._pool.leave(row)
            if row.prefill is not None:  # a chunked prefill under way: closing it closes its noise
                row.prefill.close()
            elif row.sequential and row.loop.noise is not None:
                row.loop.noise.close()

    def _fail(self, ticket: ArTicket, error: BaseException) -> None:
        with self._cv:
            mine = [row for row in self._running if row.ticket is ticket]
            self._running = [row for row in self._running if row.ticket is not ticket]
            if ticket in self._queue:
                self._queue.remove(ticket)
        self._close_rows(mine)
        ticket.rows = []
        self._finish(ticket, error=error)

    def _finish(self, ticket: ArTicket, *, result=None, error: BaseException | None = None) -> None:
        if ticket.done:
            return
        ticket.result, ticket.error, ticket.finished = result, error, time.perf_counter()
        ticket._event.set()
        if ticket.on_done is not None:
            ticket.on_done(ticket)


def _check_lora(lora, rows: int) -> None:
    """A request's ``lora`` before any work: a ``StageLora`` (or None) whose per-image selection,
    if it has one, covers the request's ``rows`` images."""
    if lora is None:
        return
    if not hasattr(lora, "sources") or not hasattr(lora, "selection"):
        raise GlmImageError(f"lora = {lora!r}; allowed: a glm_image.lora.StageLora or None")
    if isinstance(lora.selection, list) and len(lora.selection) != rows:
        raise GlmImageError(
            f"lora: a selection for {len(lora.selection)} images; the request has {rows} "
            "(allowed: one selection for every image, or one per image)"
        )


def check_max_rows(max_rows) -> None:
    """``max_rows`` (rows a scheduler decodes at once) before anything is made: an integer >= 1."""
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise GlmImageError(f"max_rows = {max_rows!r}; allowed: an integer >= 1")
