"""The AR scheduler's batched rows: sequential rows at different positions in one forward.

A ``RowPool`` holds one KV cache of ``max_rows`` rows; a row that joins copies its prompt's
keys and values (its prefill ran alone, as its solo run's) into the first free row, and from then
on every iteration decodes all the pool's rows in ONE model forward: each row its own token,
position (rotary table), cache slot and visible slots, through the model's per-row window call
(``ArModel.forward`` with ``slots`` (B, 1) and ``visible`` (B, capacity)). The running rows
stay packed in rows 0..n-1: a row that leaves is replaced by the last one (one row's K/V copied),
so the forward is over the cache's first n rows, a view. Each row still samples from its own
generator's noise with its own picker, so a row's tokens have its solo run's distribution.
Its bits: with ``invariant`` the forward is ``rows.rows_twin(model)`` (each row's products its
own one-row product, its attention its solo call), and a row's logits and tokens are its solo
run's bit for bit (the scheduler's default where rows decode apart: a CPU). Without, the rows
share each GEMM, which rounds a row's logits differently in the last bits (a GEMM of n rows is
another kernel than one row's), and sampling turns that into another token now and then: what an
accelerator trades for throughput. Greedy rows give the solo tokens unless two logits tie.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from . import graphs
from .decode import decide

__all__ = ["ROW_BUCKETS", "RowPool"]

log = logging.getLogger(__name__)

# running rows a step graph is captured for: n rows replay the graph of the smallest bucket that
# holds them (capped at the pool's rows), the rows past n padding that compute and are not read
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(eq=False)
class _StepGraph:
    """One bucket of running rows: the buffers its graph reads (refilled in place every step,
    never rebound: the graph holds their addresses), the logits it writes, and the graph."""

    ids: torch.Tensor  # (rows, 1)
    cos: torch.Tensor  # (rows, 1, rotary)
    sin: torch.Tensor
    slots: torch.Tensor  # (rows, 1)
    length: torch.Tensor  # (1,) int32: the visible slots' bound
    logits: torch.Tensor | None = None
    graph: graphs.Captured | None = None


class RowPool:
    """Sequential rows decoded together (see the module docstring). ``join`` takes a row whose
    ``loop`` is a ``DecodeLoop`` after its prefill; ``step`` runs one forward of every row and
    returns the rows that wrote their last token; ``leave`` frees a row's place."""

    def __init__(self, engine, max_rows: int, *, invariant: bool = False) -> None:
        """``invariant``: the forward runs through ``rows.rows_twin`` (each row the bits of its
        solo step; the caller checked it with ``rows.check_rows``), else through the model."""
        self.engine, self.max_rows = engine, max_rows
        self.model = engine.model
        if invariant:
            from .rows import rows_twin

            self.model = rows_twin(engine.model)
        self.rows: list = []  # row i of the cache is self.rows[i]
        self.cache = None
        self.visible: torch.Tensor | None = None  # (max_rows, capacity) bool
        self.capacity = 0
        # device graphs per bucket of running rows (``batched`` on a device with graphs, unless
        # the engine's decode_step says eager or static): bucket -> graph, or why none
        self.use_graphs = (
            not invariant
            and graphs.graph_module(engine.device) is not None
            and engine.decode_step in ("auto", "graph")
        )
        self.graphs: dict[int, _StepGraph | str] = {}

    def check(self) -> str | None:
        """None if this pool's rows get their solo bits (``invariant``: ``rows.check_rows``);
        else why not. A pool that is not invariant never claims to."""
        if self.model is self.engine.model:
            return "the rows share each GEMM (mode 'batched')"
        from .rows import check_rows

        return check_rows(self.model)

    def _grow(self, capacity: int) -> None:
        """A cache of at least ``capacity`` slots per row (rounded up to 256), the rows kept."""
        if capacity <= self.capacity:
            return
        capacity = -(-capacity // 256) * 256
        cache = self.engine._cache(self.max_rows, capacity)
        visible = torch.zeros((self.max_rows, capacity), dtype=torch.bool, device=self.engine.device)
        if self.cache is not None:
            old = self.capacity
            cache.keys[:, :, :, :old].copy_(self.cache.keys)
            cache.values[:, :, :, :old].copy_(self.cache.values)
            visible[:, :old].copy_(self.visible)
        self.cache, self.visible, self.capacity = cache, visible, capacity
        self.graphs.clear()  # they read the old cache

    def join(self, row) -> None:
        loop = row.loop
        prompt, steps = loop.prompt_len, loop.tokens.shape[1]
        self._grow(prompt + steps)
        i = len(self.rows)
        self.cache.keys[:, i, :, :prompt].copy_(loop.cache.keys[:, 0, :, :prompt])
        self.cache.values[:, i, :, :prompt].copy_(loop.cache.values[:, 0, :, :prompt])
        self.visible[i].zero_()
        self.visible[i, :prompt].copy_(loop.visible[0, :prompt])
        loop.cache = None  # the row's own cache is not read again
        row.next_step = 1
        self.rows.append(row)

    def leave(self, row) -> None:
        i, last = self.rows.index(row), len(self.rows) - 1
        if i != last:
            for kv in (self.cache.keys, self.cache.values):
                kv[:, i].copy_(kv[:, last])
            self.visible[i].copy_(self.visible[last])
            self.rows[i] = self.rows[last]
        self.rows.pop()

    def step(self) -> tuple[list, list]:
        """One forward of every row: the rows that are done (they stay until ``leave``), and
        (row, error) for the rows whose own sampling failed (a fault in the shared forward
        raises: it is every row's)."""
        n = len(self.rows)
        if n == 0:
            return []
        engine, loops = self.engine, [row.loop for row in self.rows]
        device, steps = engine.device, [row.next_step for row in self.rows]
        ids = torch.cat([lp.tokens[:, s - 1 : s] for lp, s in zip(loops, steps, strict=True)])  # (n, 1)
        cos = torch.cat([lp.cos[:, s - 1 : s] for lp, s in zip(loops, steps, strict=True)])
        sin = torch.cat([lp.sin[:, s - 1 : s] for lp, s in zip(loops, steps, strict=True)])
        at = [lp.prompt_len + s - 1 for lp, s in zip(loops, steps, strict=True)]
        slots = torch.tensor(at, device=device).unsqueeze(1)  # (n, 1): each row's own slot
        self.visible[torch.arange(n, device=device), slots[:, 0]] = True
        logits = self._replay(ids, cos, sin, slots, max(at) + 1) if self.use_graphs else None
        if logits is None:
            logits = self._forward(n, ids, (cos, sin), slots, max(at) + 1)  # (n, V)
        done, failed = [], []
        for i, (row, lp, s) in enumerate(zip(self.rows, loops, steps, strict=True)):
            try:  # a row's own sampling: a fault there is the row's alone
                noise = lp._noise_row(s)
                lp.tokens[:, s] = decide(engine.model.tp, lp.picker, logits[i : i + 1], noise, lp.unfinished)
            except Exception as e:
                failed.append((row, e))
                continue
            row.next_step = s + 1
            if row.next_step == lp.tokens.shape[1]:
                done.append(row)
        return done, failed

    def _forward(self, rows: int, ids, rope, slots, length) -> torch.Tensor:
        """The logits (rows, V) of one forward over the cache's first ``rows`` rows."""
        cache = SimpleNamespace(
            keys=self.cache.keys[:, :rows], values=self.cache.values[:, :rows], capacity=self.capacity
        )
        hidden = self.model(ids, rope, cache, slots, visible=self.visible[:rows], length=length)
        return self.model.logits(hidden[:, -1])

    # ---------------------------------------------------------------- device graphs

    def _replay(self, ids, cos, sin, slots, length: int) -> torch.Tensor | None:
        """The step through its bucket's graph (captured at the bucket's first step); None where
        it cannot be captured (logged once per bucket; the step then runs eagerly)."""
        n = ids.shape[0]
        rows = min(next((b for b in ROW_BUCKETS if b >= n), n), self.max_rows)
        graph = self.graphs.get(rows)
        if isinstance(graph, str):
            return None
        if graph is None:
            graph = self.graphs[rows] = self._buffers(rows, cos.shape[-1], cos.dtype)
        self._fill(graph, n, ids, cos, sin, slots, length)
        if rows > n:  # padding rows: free slots of the pool, each seeing one slot (no empty row)
            self.visible[n:rows].zero_()
            self.visible[n:rows, 0] = True
        if graph.graph is None:

            def step() -> None:
                rope = (graph.cos, graph.sin)
                graph.logits = self._forward(rows, graph.ids, rope, graph.slots, graph.length)

            captured = graphs.capture(step, self.engine.device, reset=lambda: None)
            if isinstance(captured, str):
                log.warning("AR scheduler: %d rows decode without a device graph: %s", rows, captured)
                self.graphs[rows] = captured
                return None
            graph.graph = captured
            self.engine.graphs.count_capture()
        graph.graph.replay()
        return graph.logits[:n]

    def _buffers(self, rows: int, rotary: int, dtype: torch.dtype) -> _StepGraph:
        device = self.engine.device
        ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        cos = torch.zeros((rows, 1, rotary), dtype=dtype, device=device)
        length = torch.ones(1, dtype=torch.int32, device=device)
        return _StepGraph(ids, cos, torch.zeros_like(cos), torch.zeros_like(ids), length)

    @staticmethod
    def _fill(graph: _StepGraph, n: int, ids, cos, sin, slots, length: int) -> None:
        """This step's inputs into the bucket's buffers, in place; the padding rows zero
        (token 0 at slot 0)."""
        for buffer, value in ((graph.ids, ids), (graph.cos, cos), (graph.sin, sin), (graph.slots, slots)):
            buffer[:n].copy_(value)
            buffer[n:].zero_()
        graph.length.fill_(length)
