"""Device graphs: capture one static step once, replay it per token (one launch per step).

Written once for every device that has a graph API: CUDA (``torch.cuda.CUDAGraph``) and Ascend
(``torch.npu.NPUGraph``, which torch_npu models on it: the same ``graph`` context manager,
``Stream``, ``stream`` and ``current_stream``). A step can be captured when it reads and writes
only tensors allocated before capture and never synchronises with the host.

``capture`` runs the step once eagerly on a side stream first (lazy initialisation, kernel
compilation, allocator warm-up), then captures it. Whatever goes wrong comes back as a reason,
which the caller logs before it runs eagerly, or raises when a graph was required: a graph is
either proven (captured, replayed) or not used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = ["Captured", "capture", "graph_module"]

log = logging.getLogger(__name__)

# device type -> (the torch namespace, the name of its graph class)
_GRAPH_APIS = {"cuda": ("cuda", "CUDAGraph"), "npu": ("npu", "NPUGraph")}


def graph_module(device: torch.device) -> tuple[ModuleType, type] | None:
    """The device's torch namespace and graph class, or None where graphs do not exist."""
    entry = _GRAPH_APIS.get(device.type)
    if entry is None:
        return None
    module = getattr(torch, entry[0], None)  # torch.npu exists once torch_npu is imported
    graph_class = getattr(module, entry[1], None) if module is not None else None
    return (module, graph_class) if graph_class is not None else None


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
    return Captured(graph.replay, current.synchronize)
