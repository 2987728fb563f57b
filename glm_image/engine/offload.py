"""Block offload: a stage's blocks wait in host memory and are copied to the device just ahead of use.

The models do not see it. ``BlockStream`` takes a stage's repeated units (the DiT's transformer
blocks; the AR's attention + MLP of each layer) and hooks them: the forward pre-hook of a unit's
first module puts that unit's weights on the device (waiting for its copy) and starts the copy of
the next ``ahead`` units; the forward post-hook of its last module sends its weights back to the
host copy (the device copy is freed). At rest every streamed tensor is its host copy, so the
stage's ``to(device)`` under ``parked()`` moves everything else and leaves the blocks alone.

On CUDA the host copies are pinned and the copies run on a side stream, ordered against compute
with events (``Tensor.record_stream`` keeps a block's memory from being reused while compute
still reads it), so the next block's copy overlaps this block's compute: the idea of diffusers'
group offloading with ``use_stream=True``. On any other device (a CPU: the tests) the same code
runs synchronously: each unit is copied (``clone`` on a CPU) before it runs and dropped after,
so the offloaded path is exercised and gives the resident result bit for bit (same tensors, same
dtype, same kernels). Quantized linears stream as stored (int8 / int4 data and their scales are
parameters like any other), so a quantized block moves its quantized bytes.

Prefetch wraps around (after the last unit, the first is fetched for the next forward: the next
denoising step or decode token), and a unit skipped (the DiT's step cache runs block 0 only and
reuses the rest) is dropped when the window moves past it, so at most ``ahead + 1`` units are on
the device at any time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["AHEAD", "BlockStream", "ar_units", "dit_units"]

AHEAD = 1  # units copied ahead of the running one: two on the device at once (the planner counts 2)


def dit_units(model: nn.Module) -> list[list[nn.Module]]:
    """The DiT's streamed units: each transformer block (called as a module)."""
    return [[block] for block in model.transformer_blocks]


def ar_units(model: nn.Module) -> list[list[nn.Module]]:
    """The AR decoder's streamed units: each layer's attention and MLP. The layer norms stay on the
    device: the decoder reads the next layer's input norm outside the layer's modules, and they
    are 4 vectors of ``hidden`` per layer."""
    return [[layer.self_attn, layer.mlp] for layer in model.layers]


class _Unit:
    def __init__(self, modules: Sequence[nn.Module], pin: bool) -> None:
        self.slots: list[nn.Parameter | torch.Tensor] = []  # the streamed parameters and buffers
        self.host: list[torch.Tensor] = []
        seen: set[int] = set()
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                host = tensor.data.to("cpu")
                if pin:
                    host = host.pin_memory()
                tensor.data = host
                self.slots.append(tensor)
                self.host.append(host)
        self.nbytes = sum(h.numel() * h.element_size() for h in self.host)

    def rest(self) -> None:
        for tensor, host in zip(self.slots, self.host, strict=True):
            tensor.data = host


class BlockStream:
    """``units`` (lists of modules; see ``dit_units``, ``ar_units``) streamed to ``device``."""

    def __init__(
        self, units: Sequence[Sequence[nn.Module]], device: torch.device | str, ahead: int = AHEAD
    ) -> None:
        if ahead < 0:
            raise ValueError(f"ahead = {ahead}; allowed: 0 or more units")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.units = [_Unit(modules, pin=cuda) for modules in units]
        self.ahead = min(ahead, max(0, len(self.units) - 1))
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self._loaded: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.copies = 0  # units copied to the device (a test reads it: the path ran)
        self._hooks = []
        for index, modules in enumerate(units):
            first, last = modules[0], modules[-1]
            self._hooks.append(first.register_forward_pre_hook(self._pre(index)))
            self._hooks.append(last.register_forward_hook(self._post(index)))

    @property
    def unit_bytes(self) -> int:
        """The largest unit's bytes: the device holds ``ahead + 1`` of them while running."""
        return max((u.nbytes for u in self.units), default=0)

    @property
    def host_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def _pre(self, index: int):
        def hook(module, args):
            self._enter(index)

        return hook

    def _post(self, index: int):
        def hook(module, args, output):
            self._leave(index)

        return hook

    def _window(self, index: int) -> set[int]:
        return {(index + k) % len(self.units) for k in range(self.ahead + 1)}

    def _fetch(self, index: int) -> None:
        if index in self._loaded:
            return
        host = self.units[index].host
        if self.stream is not None:
            # the side stream must not copy into memory compute still reads: order it after compute
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                copies = [h.to(self.device, non_blocking=True) for h in host]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            copies, event = [h.to(self.device, copy=True) for h in host], None
        self._loaded[index] = (copies, event)
        self.copies += 1

    @torch.no_grad()
    def _enter(self, index: int) -> None:
        window = self._window(index)
        for stale in [i for i in self._loaded if i not in window]:  # skipped by a step cache
            del self._loaded[stale]
        self._fetch(index)
        copies, event = self._loaded[index]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for copy in copies:  # allocated on the side stream, read on compute
                copy.record_stream(compute)
        for tensor, copy in zip(self.units[index].slots, copies, strict=True):
            tensor.data = copy
        for k in range(1, self.ahead + 1):
            self._fetch((index + k) % len(self.units))

    def _leave(self, index: int) -> None:
        self.units[index].rest()
        self._loaded.pop(index, None)

    def release(self) -> None:
        """Drop every device copy (the prefetched ones too): the stage is going off the device."""
        for unit in self.units:
            unit.rest()
        self._loaded.clear()

    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """Inside: the streamed tensors are empty, so moving the stage (``engine.to``) leaves the
        blocks in host memory; after: they are their host copies again."""
        self.release()
        for unit in self.units:
            for tensor, host in zip(unit.slots, unit.host, strict=True):
                tensor.data = torch.empty(0, dtype=host.dtype)
        try:
            yield
        finally:
            for unit in self.units:
                unit.rest()

    def close(self) -> None:
        """Remove the hooks; the blocks stay in host memory."""
        self.release()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
