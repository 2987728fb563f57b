"""Device graphs per bucket of running rows (``engine.row_pool``, the scheduler's ``batched``
mode on a device with graphs). No GPU here: ``fake_graphs`` gives the CPU a graph API whose
graph records the ATen ops of its capture and replays them on the same memory without running
the step's Python, so a buffer rebound to a new tensor, or a value of the capturing step baked
in, writes other tokens, as on a GPU. The oracle is the same pool run eagerly: a replay runs the
very ops of the eager step, so the tokens must be equal bit for bit."""

from __future__ import annotations

import pytest
import torch
from fake_graphs import install

from glm_image.engine import graphs, row_pool
from glm_image.engine.graphs import GraphCache
from glm_image.engine.scheduler import ArScheduler

CALLS = [  # joining one iteration apart: 1, 2, 3 rows, then 2 again as the short one leaves
    (("a tall blue 'SIGN' in the rain", 128, 96), {"seeds": 1, "max_new_tokens": 60}),
    (("a red circle", 64, 64), {"seeds": 2, "max_new_tokens": 10}),
    (("一张写着「欢迎」的海报", 64, 128), {"seeds": 3, "max_new_tokens": 40}),
    (("a wide field", 64, 64), {"seeds": 4, "greedy": True, "max_new_tokens": 30}),
]


@pytest.fixture
def engine(tiny_ar, monkeypatch):
    install(monkeypatch)
    monkeypatch.setattr(tiny_ar, "graphs", GraphCache())
    return tiny_ar


def _run(engine, decode_step: str, max_rows: int = 3) -> tuple[list, ArScheduler, list]:
    with pytest.MonkeyPatch.context() as patch:  # the session's engine is read-only
        patch.setattr(engine, "decode_step", decode_step)
        return _run_calls(engine, max_rows)


def _run_calls(engine, max_rows: int) -> tuple[list, ArScheduler, list]:
    scheduler = ArScheduler(engine, max_rows=max_rows, mode="batched")
    tickets, running = [], []
    for args, kwargs in CALLS:
        tickets.append(scheduler.submit(*args, **kwargs))
        scheduler.step()
    while not scheduler.idle:
        scheduler.step()
        running.append(len(scheduler._pool.rows))
    return [t.wait().tokens for t in tickets], scheduler, running


def test_each_bucket_of_rows_replays_its_capture(engine):
    eager, scheduler, _ = _run(engine, "eager")
    assert not scheduler._pool.use_graphs and engine.graphs.captures == 0
    replayed, scheduler, running = _run(engine, "auto")
    assert scheduler._pool.use_graphs
    for a, b in zip(eager, replayed, strict=True):
        assert torch.equal(a, b)
    # buckets 1, 2 and 3 (the pool's rows cap the bucket of 4), one capture each per capacity
    pool = scheduler._pool
    assert {1, 2, 3} >= set(running) - {0} >= {2, 3}
    assert all(isinstance(g, row_pool._StepGraph) and g.graph is not None for g in pool.graphs.values())
    assert engine.graphs.captures >= len(pool.graphs)
    before = engine.graphs.captures
    again, _, _ = _run(engine, "auto")  # a new pool: its own buckets
    assert all(torch.equal(a, b) for a, b in zip(eager, again, strict=True))
    assert engine.graphs.captures > before


def test_a_rebound_buffer_writes_other_tokens(engine, monkeypatch):
    """The test can fail: a fill that rebinds the buffers (what a graph does not see) replays the
    capturing step's inputs."""
    eager, _, _ = _run(engine, "eager")

    def rebinding(graph, n, ids, cos, sin, slots, length):
        graph.ids, graph.cos, graph.sin, graph.slots = ids, cos, sin, slots
        graph.length = torch.tensor([length], dtype=torch.int32)

    monkeypatch.setattr(row_pool.RowPool, "_fill", staticmethod(rebinding))
    wrong, _, _ = _run(engine, "auto")
    assert any(not torch.equal(a, b) for a, b in zip(eager, wrong, strict=True))


def test_a_failed_capture_runs_eagerly_and_says_why(engine, monkeypatch, caplog):
    eager, _, _ = _run(engine, "eager")
    monkeypatch.setattr(graphs, "capture", lambda step, device, reset: "capture failed: a test")
    with caplog.at_level("WARNING", logger="glm_image.engine.row_pool"):
        tokens, scheduler, _ = _run(engine, "auto")
    assert all(torch.equal(a, b) for a, b in zip(eager, tokens, strict=True))
    assert set(scheduler._pool.graphs.values()) == {"capture failed: a test"}
    assert "decode without a device graph: capture failed: a test" in caplog.text
