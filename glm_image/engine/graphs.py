"""Device graphs: capture one static step, replay it per token (one launch per step), and keep it
for the later calls of the same shape.

Written once for every device that has a graph API: CUDA (``torch.cuda.CUDAGraph``) and Ascend
(``torch.npu.NPUGraph``, which torch_npu models on it: the same ``graph`` context manager,
``Stream``, ``stream`` and ``current_stream``). A step can be captured when it reads and writes
only tensors allocated before capture and never synchronises with the host.

``capture`` runs the step once eagerly on a side stream first (lazy initialisation, kernel
compilation, allocator warm-up), then captures it. Whatever goes wrong comes back as a reason,
which the caller logs before it runs eagerly, or raises when a graph was required: a graph is
either proven (captured, replayed) or not used.

Captured once per bucket per process (``GraphCache``, one per AR engine). A graph replays the
same kernels on the same memory with the same scalars, so everything a call changes (the prompt
and its length, the number of steps, the rotary tables, the seeds' noise) lives in buffers the
graph reads, and a bucket is what fixes every buffer's shape and the step's code: the decoding
(sequential, or Jacobi with its window and draft options), the batch, the KV capacity rounded up
to ``CAPACITY_STEP`` slots (prompts and sizes near each other share one), the sampling (greedy or
not, filters, grid constraint), the LoRA selection and the ops backend. A bucket's first call
allocates its buffers, runs the prefill into them and captures; every later call copies its
inputs into the same buffers (``copy_`` / ``fill_``, never a new tensor: the graph holds the old
addresses) and replays, capturing nothing. vLLM and SGLang capture their decode graphs per batch
size once at start-up; here a bucket is captured at its first call, as CUDA-graph trees do.

Memory: a bucket keeps what its call held, after the call: the KV cache (2 x layers x batch x KV
heads x capacity x head_dim elements; released model, bf16: 40 KiB per slot per row, 60 MiB per
row at 1024x1024's 1536 slots), the sampling noise (batch x 256 x 16512 float32: 16.1 MiB per row)
or Jacobi's buffers (batch x W x 16512 float32 for the draft distributions), the rotary tables
and masks (a few KiB per slot), and the graph's private pool (one step's activations). The cache
is an LRU of ``limit`` buckets (``DEFAULT_BUCKETS``): a new bucket evicts the least recently used
one and its tensors and graph go back to torch's caching allocator once no call holds them.
``limit`` 0 keeps none (a capture per call, the buffers freed after it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from ..errors import GlmImageError

__all__ = [
    "CAPACITY_STEP",
    "DEFAULT_BUCKETS",
    "Bucket",
    "CallLease",
    "Captured",
    "GraphCache",
    "bucket_capacity",
    "capture",
    "capture_step",
    "graph_module",
    "run_steps",
    "step_context",
    "step_mode",
]

log = logging.getLogger(__name__)

# device type -> (the torch namespace, the name of its graph class)
_GRAPH_APIS = {"cuda": ("cuda", "CUDAGraph"), "npu": ("npu", "NPUGraph")}

CAPACITY_STEP = 256  # KV slots: a bucket's capacity is the call's need rounded up to a multiple
DEFAULT_BUCKETS = 4  # buckets an engine keeps (each holds its KV cache: see the module docstring)


def graph_module(device: torch.device) -> tuple[ModuleType, type] | None:
    """The device's torch namespace and graph class, or None where graphs do not exist."""
    entry = _GRAPH_APIS.get(device.type)
    if entry is None:
        return None
    module = getattr(torch, entry[0], None)  # torch.npu exists once torch_npu is imported
    graph_class = getattr(module, entry[1], None) if module is not None else None
    return (module, graph_class) if graph_class is not None else None


def step_context(model: torch.nn.Module) -> tuple:
    """What a captured AR step depends on beyond its buffers' shapes and the sampling, for its
    bucket's key: the ops backend (its kernels) and the LoRA selection (the forward hooks'
    adapters and scales, per image)."""
    from ..lora import LoraSet

    selection = LoraSet.of(model).selection
    return model.ops, tuple(selection) if isinstance(selection, list) else selection


def bucket_capacity(slots: int) -> int:
    """The KV capacity of the bucket of a call that needs ``slots`` slots per row."""
    return -(-slots // CAPACITY_STEP) * CAPACITY_STEP


@dataclass
class Captured:
    """A captured step: ``replay()`` runs it; ``synchronize()`` waits for the queued replays."""

    replay: Callable[[], None]
    synchronize: Callable[[], None]


def capture(step: Callable[[], None], device: torch.device, *, reset: Callable[[], None]) -> Captured | str:
    """Capture ``step`` on ``device``; the reason as a string if it cannot be captured.

    ``step`` runs once eagerly before capture (and once inside it, which on the device only
    records); ``reset`` then undoes that eager run's effect on the step's own state (e.g. a step
    counter), so the first replay computes what the eager run did.
    """
    api = graph_module(device)
    if api is None:
        return f"{device.type} has no graph API in this torch build"
    module, graph_class = api
    current = module.current_stream(device)
    stream = module.Stream(device)
    stream.wait_stream(current)
    graph = graph_class()
    try:
        with module.stream(stream):
            step()
            with module.graph(graph, stream=stream):
                step()
    except RuntimeError as e:
        return f"capture failed: {e}"
    finally:
        current.wait_stream(stream)
        reset()
    # a later call may replay from another thread: wait for the stream current then
    return Captured(graph.replay, lambda: module.current_stream(device).synchronize())


def capture_step(
    step: Callable[[], None],
    device: torch.device,
    state: Sequence[torch.Tensor],
    bucket: Bucket | None = None,
) -> tuple[Captured | str, int]:
    """``step``'s graph and the captures that made (0 or 1), or the reason it cannot be captured:
    ``bucket``'s graph (captured at its first call), or one captured for this call alone. The
    eager run before a capture is undone by restoring ``state``, the step's own tensors (copied
    only when a capture happens)."""
    if bucket is not None and (bucket.graph is not None or bucket.failed is not None):
        return bucket.graph_for(step, device, lambda: None)
    saved = [x.clone() for x in state]

    def reset() -> None:
        for x, s in zip(state, saved, strict=True):
            x.copy_(s)

    if bucket is not None:
        return bucket.graph_for(step, device, reset)
    captured = capture(step, device, reset=reset)
    return captured, 0 if isinstance(captured, str) else 1


@dataclass(eq=False)
class Bucket:
    """One bucket's state (``state``: the decode loop whose buffers the graph reads and writes)
    and its graph once captured; a call holds ``lock`` from its prefill to its last token."""

    key: Hashable
    state: Any
    owner: GraphCache
    graph: Captured | None = None
    failed: str | None = None  # why capture failed: later calls run eagerly without trying again
    lock: threading.Lock = field(default_factory=threading.Lock)

    def graph_for(
        self, step: Callable[[], None], device: torch.device, reset: Callable[[], None]
    ) -> tuple[Captured | str, int]:
        """The bucket's graph, captured now if this is its first call (``capture``'s contract),
        and the captures that made (0 or 1); the reason instead where it cannot be captured."""
        if self.graph is not None:
            return self.graph, 0
        if self.failed is not None:
            return self.failed, 0
        captured = capture(step, device, reset=reset)
        if isinstance(captured, str):
            self.failed = captured
            return captured, 0
        self.graph = captured
        self.owner.count_capture()
        return captured, 1


class GraphCache:
    """An engine's buckets (see the module docstring), least recently used first; ``captures``
    counts the graphs captured in this process's lifetime of the engine."""

    def __init__(self, limit: int = DEFAULT_BUCKETS) -> None:
        if limit < 0:
            raise ValueError(f"graph buckets = {limit}; allowed: an integer >= 0")
        self.limit = limit
        self.captures = 0
        self._buckets: OrderedDict[Hashable, Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def count_capture(self) -> None:
        with self._lock:
            self.captures += 1

    @contextlib.contextmanager
    def lease(self, key: Hashable, make: Callable[[], Any]) -> Iterator[Bucket]:
        """The bucket of ``key`` (its state made by ``make()`` on first use), held for one call:
        a second call of the same bucket waits for the first to end."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = Bucket(key, make(), self)
                if self.limit:
                    self._buckets[key] = bucket
                    while len(self._buckets) > self.limit:  # the least recently used goes
                        evicted, _ = self._buckets.popitem(last=False)
                        log.debug("graph bucket evicted: %s", evicted)
            else:
                self._buckets.move_to_end(key)
        with bucket.lock:
            yield bucket

    @contextlib.contextmanager
    def leasing(self) -> Iterator[CallLease]:
        """One call's leases: ``lease(key, make)`` inside the block gives the bucket, held until
        the block ends; ``lease.bucket`` is the last one given."""
        with contextlib.ExitStack() as stack:
            yield CallLease(self, stack)

    def clear(self) -> None:
        """Drop every bucket (the engine moved: their buffers are on the old device)."""
        with self._lock:
            self._buckets.clear()


class CallLease:
    """``GraphCache.leasing``'s callable: the bucket of a key, held by the call's block."""

    def __init__(self, cache: GraphCache, stack: contextlib.ExitStack) -> None:
        self._cache, self._stack = cache, stack
        self.bucket: Bucket | None = None

    def __call__(self, key: Hashable, make: Callable[[], Any]) -> Bucket:
        self.bucket = self._stack.enter_context(self._cache.lease(key, make))
        return self.bucket


# ---------------------------------------------------------------------- how a call's steps run


def step_mode(engine, host_logits: bool) -> tuple[str, contextlib.AbstractContextManager]:
    """``engine`` (an ``ArEngine``): how the steps after the prefill's token run (``decode_step`` resolved for the device;
    eager when the raw logits go to the host step by step), and the block that holds the
    call's graph bucket (``engine.graphs``): it gives a lease for a graph on a device that has
    graphs, else None. (Without a graph API the capture fails, naming the reason.)"""
    mode, graphs = engine.decode_step, graph_module(engine.device) is not None
    if host_logits:
        if mode in ("static", "graph"):
            raise GlmImageError(f"return_logits needs decode_step 'eager' or 'auto', not {mode!r}")
        mode = "eager"
    mode = ("graph" if graphs else "eager") if mode == "auto" else mode
    return mode, engine.graphs.leasing() if mode == "graph" and graphs else contextlib.nullcontext()


def run_steps(
    engine,
    loop,
    steps: int,
    kept_logits: list | None,
    progress,
    mode: str,
    lease: CallLease | None = None,
) -> str:
    """The steps after the prefill's token (sequential steps or Jacobi iterations) as
    ``mode`` (``step_mode``) says, a graph from ``lease``'s bucket where there is one;
    returns how they ran."""
    if mode == "graph":
        reason = loop.run_graph(steps, progress, lease.bucket if lease is not None else None)
        if reason is None:
            return "graph"
        if engine.decode_step == "graph":
            raise GlmImageError(f"decode_step = 'graph': the decode step cannot be captured ({reason})")
        log.warning("decoding without a device graph: %s", reason)
        mode = "eager"
    if mode == "static":
        loop.run_static(steps, progress)
    else:
        loop.run_eager(steps, kept_logits.append if kept_logits is not None else None, progress)
    return mode
