"""A device-graph API for CPU tests: ``torch.cuda``'s ``graph`` / ``Stream`` contract, with a graph
that records the ATen ops of its capture and replays them on the same memory.

A CUDA graph replays the captured kernels with their captured arguments: the same addresses,
the same scalars, the same branches. Re-running the step's Python would hide exactly the bugs a
graph shows (a buffer rebound to a new tensor, a Python int of one call baked into the step), so
this graph never runs Python at replay: it re-executes each recorded op on the recorded tensors
and copies a fresh result into the tensor the capture produced (what a kernel writing into the
graph's private pool does). A host read during capture (``.item()``, ``bool(t)``) keeps its
captured value and branch, as a graph would; a replay whose read would differ raises (a real
capture fails at the read instead). The CPU step has one: ``TokenPicker.only_codes`` asks
whether a row lost every code, a shortcut taken on CPUs only.
Work outside torch's dispatcher is invisible here (NumPy: ``sampling.tokens._top_p_threshold``,
the CPU's top-p); a test switches such shortcuts off, as a device never takes them.

Unlike a real capture, the step runs for real while it is recorded: ``graphs.capture``'s reset
must undo it as well as the warm-up before it.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["FakeGraphs", "install"]


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: FakeGraph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out))
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class FakeGraph:
    def __init__(self) -> None:
        self.ops: list = []  # (op, args, kwargs, outputs) as captured

    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            result = func(*args, **kwargs)
            recorded = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            if not recorded:  # a host read: the graph keeps the capture's value and branch
                if result != out:
                    raise AssertionError(f"a replay's host read ({func}) differs from the capture's")
                continue
            fresh = [n for n in tree_flatten(result)[0] if isinstance(n, torch.Tensor)]
            for new, old in zip(fresh, recorded, strict=True):
                if old.numel() and _storage(new) != _storage(old):  # not in place, not a view
                    old.copy_(new)


class FakeGraphs:
    """The namespace ``graphs.graph_module`` finds (``torch.fakegraphs``, class ``Graph``)."""

    Graph = FakeGraph

    class Stream:
        def __init__(self, device=None) -> None:
            pass

        def wait_stream(self, other) -> None:
            pass

        def synchronize(self) -> None:
            pass

    @staticmethod
    def current_stream(device=None):
        return FakeGraphs.Stream(device)

    @staticmethod
    @contextlib.contextmanager
    def stream(stream):
        yield

    @staticmethod
    @contextlib.contextmanager
    def graph(graph: FakeGraph, stream=None):
        with _Recorder(graph):
            yield


def install(monkeypatch) -> type[FakeGraphs]:
    """Make the CPU a device with this graph API for the test (``monkeypatch`` undoes it)."""
    from glm_image.engine import graphs

    monkeypatch.setattr(torch, "fakegraphs", FakeGraphs, raising=False)
    monkeypatch.setitem(graphs._GRAPH_APIS, "cpu", ("fakegraphs", "Graph"))
    return FakeGraphs
