"""The reference backend ``sdpa``, and ``Ops``, what every backend shares.

``TorchOps``'s ops ARE the kernels' torch twins (``glm_image_kernels.*_reference``): one copy of
the reference maths, which the Triton kernels are tested against and this backend runs. Each
twin's docstring is the op's contract (shapes, masks, dtypes, exact formula). The models call
ops only through a backend object, so a faster backend (``triton``, ``npu``) replaces an op and
must give the same result within ``selfcheck.TOLERANCES``; anything it cannot do falls back here
with a stated reason (``Ops.fallback``), logged once. Before a non-reference backend serves a
(device, dtype) for the first time, its replaced ops are checked against these (``Ops.verify``,
see ``selfcheck``); one that raises or disagrees is switched off for the process.

Quantized linears (``quant_linear``) are the one family where the reference backend runs more
than the reference: torch's own quantized matmuls where torch has one for the device and format
(``ops.quant``), checked against the reference (``quant_linear_reference``) like a kernel is.

Masks and rotary tables are read-only for a backend and are not modified in place by the caller
while a forward uses them, so a backend may derive what it needs from them once per forward
(the ``npu`` backend converts mask polarity and the sin sign once, not once per layer).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import glm_image_kernels as kernels
import torch
import torch.nn.functional as F

from . import selfcheck
from .quant import TORCH_PATHS

if TYPE_CHECKING:
    from .quant import QuantPath
    from .selfcheck import CheckRow, CheckSizes

__all__ = ["Ops", "TorchOps", "capturing"]

log = logging.getLogger("glm_image.ops")


def capturing(device_type: str) -> bool:
    """True while torch.compile traces or a graph is captured on ``device_type``'s current stream:
    work must then be recorded in the graph (no eager-mode shortcuts, no host reads)."""
    if torch.compiler.is_compiling():
        return True
    if device_type == "cpu":
        return False
    if device_type == "cuda" and not torch.cuda.is_initialized():
        return False
    is_capturing = getattr(getattr(torch, device_type, None), "is_current_stream_capturing", None)
    return bool(is_capturing()) if callable(is_capturing) else False


class Ops:
    """A backend: a name, the device it serves, and the op families. Subclasses override ops.

    The engine calls a backend from one thread at a time (its worker), so the per-object records
    below need no lock; the process-wide self-check verdicts have one (``selfcheck``).
    """

    name = "?"
    # the quantized matmuls this backend tries, in order (see ``ops.quant``)
    quant_paths: tuple[QuantPath, ...] = ()

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._told: set[tuple[str, str]] = set()
        # (device, dtype) -> {op: why its kernel is switched off}, from the self-check
        self._off: dict[tuple[torch.device, torch.dtype], dict[str, str]] = {}
        # set on the private instance the self-check runs: the fallbacks it took, and no checks
        self._probing: list[tuple[str, str]] | None = None
        self.check_sizes: CheckSizes | None = None  # the model's sizes, once ``verify`` is told
        # (device, dtype, format) -> {quant path: why it is switched off}, from ``verify_quant``
        self._quant_off: dict[tuple[torch.device, torch.dtype, str], dict[str, str]] = {}

    def fallback(self, op: str, reason: str) -> None:
        """Note (once per op and reason) that ``op`` runs on the reference path, and why."""
        if self._probing is not None:
            self._probing.append((op, reason))
        elif (op, reason) not in self._told:
            self._told.add((op, reason))
            log.info("%s backend: %s falls back to sdpa (%s)", self.name, op, reason)

    @property
    def fallbacks(self) -> list[tuple[str, str]]:
        """(op, reason) for every fallback taken so far."""
        return sorted(self._told)

    def verify(self, dtype: torch.dtype, sizes: CheckSizes | None = None) -> list[CheckRow]:
        """Check every op this backend replaces against the reference, on the backend's device in
        ``dtype`` at ``sizes`` (the model's; default: the released model's), once per process
        and (backend, device, dtype); ops that fail are switched off here. Returns the rows (see
        ``selfcheck``). Engines call it after loading; otherwise the first call of a replaced op
        for a (device, dtype) runs it, at the sizes last given here."""
        return selfcheck.verify(self, TorchOps, self.device, dtype, sizes)

    def _switched_off(self, op: str, x: torch.Tensor) -> str | None:
        """Why ``op``'s kernel must not run for x's device and dtype (the self-check failed it),
        or None. The first call for a (device, dtype) runs the check, unless a graph is being
        captured (the check reads results back to the host): the kernel then runs unchecked."""
        off = self._off.get((x.device, x.dtype))
        if off is None:
            if self._probing is not None or capturing(x.device.type):
                return None
            selfcheck.verify(self, TorchOps, x.device, x.dtype)
            off = self._off[(x.device, x.dtype)]
        return off.get(op)

    def verify_quant(self, dtype: torch.dtype, kind: str, sizes: CheckSizes | None = None) -> list[CheckRow]:
        """Check this backend's quantized matmuls for format ``kind`` against the reference (once
        per process and (backend, device, dtype, format)); the ones that fail are switched off.
        Engines call it after loading a quantized model; otherwise the first call does."""
        return selfcheck.verify_quant(self, self.device, dtype, kind, sizes)

    def quant_linear(
        self, x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, choices: dict | None = None
    ) -> torch.Tensor:
        """``x @ dequantize(weight)^T + bias``: x (..., K), weight a ``QuantWeight`` (N, K), bias
        (N,) or None; returns (..., N) in x's dtype. The first of ``quant_paths`` that takes the
        inputs and passed its self-check runs; otherwise the reference (``quant_linear_reference``).

        ``choices``: a dict the caller keeps (a ``QuantLinear`` keeps one), where the choice is
        remembered per kind of call, so a linear chooses once, not per call. A kind of call is
        what the paths' conditions read: device, dtype, whether the rows fit a decode GEMM
        (``MAX_QUANT_ROWS``), a unit last stride, and whether gradients are on; within one kind
        every path takes the inputs or refuses them alike. Nothing is remembered while a device
        graph is captured or a check probes (the check's outcome is not known yet)."""
        rows = x.reshape(-1, x.shape[-1])
        key = None
        if choices is not None:
            key = (
                rows.device,
                rows.dtype,
                rows.shape[0] <= kernels.MAX_QUANT_ROWS,
                rows.stride(-1) == 1,
                torch.is_grad_enabled() and rows.requires_grad,
            )
            if key in choices:
                path = choices[key]
                if path is None:
                    return kernels.quant_linear_reference(x, weight, bias)
                return path.run(rows, weight, bias).view(*x.shape[:-1], weight.out_features)
        why = []
        chosen = None
        for path in self.quant_paths:
            if weight.kind not in path.kinds:
                continue
            reason = path.unfit(rows, weight) or self._quant_switched_off(path.name, rows, weight.kind)
            if reason is None:
                chosen = path
                break
            why.append(f"{path.name}: {reason}")
        if key is not None and self._probing is None and not capturing(rows.device.type):
            choices[key] = chosen
        if chosen is not None:
            return chosen.run(rows, weight, bias).view(*x.shape[:-1], weight.out_features)
        if why:
            self.fallback(f"quant_linear[{weight.kind}]", "; ".join(why))
        return kernels.quant_linear_reference(x, weight, bias)

    def _quant_switched_off(self, path: str, x: torch.Tensor, kind: str) -> str | None:
        off = self._quant_off.get((x.device, x.dtype, kind))
        if off is None:
            if self._probing is not None or capturing(x.device.type):
                return None
            selfcheck.verify_quant(self, x.device, x.dtype, kind)
            off = self._quant_off[(x.device, x.dtype, kind)]
        return off.get(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, device={self.device})"


class TorchOps(Ops):
    """``sdpa``: torch's scaled_dot_product_attention and plain tensor maths. Always registered.

    Every op but ``swiglu`` (which no kernel replaces) is its kernel's twin, bound as is.
    """

    name = "sdpa"
    quant_paths = TORCH_PATHS

    attention = staticmethod(kernels.attention_reference)
    decode_attention = staticmethod(kernels.decode_attention_reference)
    window_attention = staticmethod(kernels.window_attention_reference)
    rms_norm = staticmethod(kernels.rms_norm_reference)
    add_rms_norm = staticmethod(kernels.add_rms_norm_reference)
    layer_norm_modulate = staticmethod(kernels.layer_norm_modulate_reference)
    rotary_ = staticmethod(kernels.rotary_reference_)
    qk_norm_rope = staticmethod(kernels.qk_norm_rope_reference)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for x = [gate, up] along the last dim (the AR model's MLP)."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
