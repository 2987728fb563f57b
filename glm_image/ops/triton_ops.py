"""The ``triton`` backend: our fused kernels (``glm_image_kernels``) where they fit, torch elsewhere.

Kernels: decode attention over the static KV cache (flash-decoding, GQA) and its Jacobi-window
form (W queries per row, causal with per-row offsets), M-RoPE in place,
RMSNorm and the fused residual step, LayerNorm + AdaLN modulation, QK LayerNorm + 2D RoPE, and
the weight-only int8 / int4 decode GEMM of quantized linears for 1 to ``MAX_QUANT_ROWS`` (128)
activation rows, a batch times its Jacobi window (``quant_paths``: the path keeps its first name,
``triton-gemv``; a row's bits do not depend on the other rows, ``glm_image_kernels.quant_linear``;
more rows and fp8 take torch's paths, ``ops.quant``). Each
op checks its inputs per call (device, dtype, strides, sizes) and, when a kernel cannot take
them, runs the ``sdpa`` method instead after ``Ops.fallback`` records the reason (logged once).

Prefill and DiT attention stay torch SDPA with torch's own backend dispatch (``attention`` is
inherited): a Triton prefill kernel would not beat cuDNN / FlashAttention-2 inside SDPA.

Before a kernel serves a (device, dtype) for the first time, the self-check runs it against its
twin (``Ops.verify``, ``selfcheck``); one that raises or disagrees is switched off for the
process, and its calls take the same fallback path as inputs it cannot take.

Kernels take CUDA tensors, or CPU tensors when the kernels were imported under
``TRITON_INTERPRET=1`` (Triton's interpreter: tests only, slow).
"""

from __future__ import annotations

import glm_image_kernels as kernels
import torch

from .quant import TORCH_PATHS, QuantPath
from .torch_ops import TorchOps

__all__ = ["TritonOps"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GROUP = 64  # query heads per KV head served by one decode program


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _gemv_unfit(x: torch.Tensor, weight) -> str | None:
    """Why the quantized decode GEMM kernel cannot take x (M, K) and ``weight``, or None."""
    if not kernels.HAVE_TRITON:
        return "Triton is not installed"
    kinds = {x.device.type, weight.data.device.type}
    if kinds - {"cuda", "cpu"} or len(kinds) != 1:
        return "tensors not on one CUDA device"
    if "cpu" in kinds and not kernels.interpreted():
        return "CPU tensors, and glm_image_kernels was imported without TRITON_INTERPRET=1"
    if x.dtype not in _DTYPES:
        return f"activations in {x.dtype}"
    if x.shape[0] > kernels.MAX_QUANT_ROWS:
        return f"more than {kernels.MAX_QUANT_ROWS} rows (compute-bound: dequantize + tensor-core GEMM)"
    if x.shape[1] != weight.in_features or x.stride(-1) != 1:
        return "activations not (M, in_features) with a unit last stride"
    if not all(t.is_contiguous() for t in (weight.data, weight.scale, weight.zero) if t is not None):
        return "a weight that is not contiguous"
    if weight.kind == "int4" and not (_power_of_two(weight.group) and weight.group <= 256):
        return f"int4 group {weight.group} (kernel needs a power of two up to 256)"
    if torch.is_grad_enabled() and x.requires_grad:
        return "inputs that need gradients (the kernels are inference-only)"
    return None


def _gemv(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None and bias.stride(-1) != 1:  # the kernel reads a contiguous bias
        bias = bias.contiguous()
    return kernels.quant_linear(x, weight, bias)  # one launch for every row count (LAUNCH)


GEMV_PATH = QuantPath("triton-gemv", ("int8", "int4"), _gemv_unfit, _gemv)


class TritonOps(TorchOps):
    """``triton``: see the module docstring. Registered for CUDA (and CPU under the interpreter)."""

    name = "triton"
    quant_paths = (GEMV_PATH, *TORCH_PATHS)

    def __init__(self, device: torch.device | str = "cuda") -> None:
        super().__init__(device)
        self._reference = TorchOps(self.device)  # a fallback runs wholly on sdpa, inner ops included

    # ------------------------------------------------------------------ checks

    def _unfit(self, *tensors: torch.Tensor, strided: tuple[torch.Tensor, ...] = ()) -> str | None:
        """Why the kernels cannot take ``tensors`` (all of one float dtype, on a kernel device,
        unit last stride for those in ``strided``, or all when it is empty), or None."""
        if not kernels.HAVE_TRITON:
            return "Triton is not installed"
        kinds = {t.device.type for t in tensors}
        if kinds - {"cuda", "cpu"} or len(kinds) != 1:
            return f"tensors on {', '.join(sorted(kinds))} (kernels run on one CUDA device)"
        if "cpu" in kinds and not kernels.interpreted():
            return "CPU tensors, and glm_image_kernels was imported without TRITON_INTERPRET=1"
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            return f"mixed dtypes {', '.join(sorted(str(d) for d in dtypes))}"
        if (dtype := dtypes.pop()) not in _DTYPES:
            return f"dtype {dtype} (kernels take float16, bfloat16, float32)"
        if any(t.stride(-1) != 1 for t in strided or tensors):
            return "a last dimension that is not contiguous"
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return "inputs that need gradients (the kernels are inference-only)"
        return None

    # ------------------------------------------------------------------ attention

    def _cache_unfit(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor,
        length: int | torch.Tensor | None,
        *,
        queries: str,
    ) -> str | None:
        """Why the attention kernels over the static KV cache (decode, window) cannot take q
        (B, H, ``queries``, D) over keys / values (B, KV, C, D) with ``visible`` (B, C), or None."""
        reason = self._unfit(q, keys, values)
        if reason is None and (q.dim() != 4 or keys.dim() != 4):
            reason = (
                f"q {tuple(q.shape)}, keys {tuple(keys.shape)} (need (B, H, {queries}, D), (B, KV, C, D))"
            )
        if reason is None:
            b, h, _, d = q.shape
            kv = keys.shape[1]
            if h % kv or keys.shape != values.shape or keys.shape[0] != b or keys.shape[3] != d:
                reason = f"shapes q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
            elif not (_power_of_two(d) and 16 <= d <= 256):
                reason = f"head_dim {d} (kernel needs a power of two in [16, 256])"
            elif h // kv > _MAX_GROUP:
                reason = f"{h // kv} query heads per KV head (kernel serves up to {_MAX_GROUP})"
            elif visible.dtype != torch.bool or visible.shape != (b, keys.shape[2]):
                reason = f"visible {visible.dtype} {tuple(visible.shape)} (needs bool (B, capacity))"
            elif visible.device != q.device:
                reason = "visible on another device"
            elif isinstance(length, torch.Tensor) and (
                length.numel() != 1 or length.dtype.is_floating_point or length.device != q.device
            ):
                reason = "a length tensor that is not one integer on the device"
        return reason

    def decode_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor,
        *,
        scale: float,
        length: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``TorchOps.decode_attention``; ``length`` may also be a one-element integer tensor on
        the device (a bound that changes between replays of a CUDA graph)."""
        reason = self._cache_unfit(q, keys, values, visible, length, queries="1")
        if reason is None and q.shape[2] != 1:
            reason = f"shapes q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        reason = reason or self._switched_off("decode_attention", q)
        if reason is not None:
            self.fallback("decode_attention", reason)
            # a device-tensor bound is not read back (no host sync, e.g. under graph capture):
            # the mask alone bounds the attention, as the contract allows
            return self._reference.decode_attention(q, keys, values, visible, scale=scale, length=length)
        return kernels.decode_attention(q, keys, values, visible, scale=scale, length=length)

    def window_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor,
        query_slots: torch.Tensor,
        *,
        scale: float,
        length: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``TorchOps.window_attention`` (a Jacobi window: W queries per row, causal with per-row
        offsets); ``length`` may be a one-element integer tensor on the device, as for decode."""
        reason = self._cache_unfit(q, keys, values, visible, length, queries="W")
        if reason is None:
            b, _, w, _ = q.shape
            if not 1 <= w <= kernels.MAX_WINDOW:
                reason = f"a window of {w} queries (kernel serves 1 to {kernels.MAX_WINDOW})"
            elif query_slots.dtype.is_floating_point or query_slots.shape != (b, w):
                reason = f"query_slots {query_slots.dtype} {tuple(query_slots.shape)} (needs integers (B, W))"
            elif query_slots.device != q.device:
                reason = "visible or query_slots on another device"
        reason = reason or self._switched_off("window_attention", q)
        if reason is not None:
            self.fallback("window_attention", reason)
            return self._reference.window_attention(
                q, keys, values, visible, query_slots, scale=scale, length=length
            )
        return kernels.window_attention(q, keys, values, visible, query_slots, scale=scale, length=length)

    # ------------------------------------------------------------------ normalisation

    def _norm_unfit(
        self, x: torch.Tensor, *weights: torch.Tensor, residual: torch.Tensor | None = None
    ) -> str | None:
        reason = self._unfit(x, *weights) if residual is None else self._unfit(x, residual, *weights)
        if reason is None and residual is not None and residual.shape != x.shape:
            reason = f"residual {tuple(residual.shape)} for x {tuple(x.shape)}"
        if reason is None:
            dim = x.shape[-1]
            if dim > kernels.MAX_NORM_DIM:
                reason = f"dim {dim} (kernel holds rows up to {kernels.MAX_NORM_DIM})"
            elif any(w.shape != (dim,) for w in weights):
                reason = (
                    f"weights of shape {', '.join(str(tuple(w.shape)) for w in weights)} for rows of {dim}"
                )
        return reason

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        reason = self._norm_unfit(x, weight) or self._switched_off("rms_norm", x)
        if reason is not None:
            self.fallback("rms_norm", reason)
            return self._reference.rms_norm(x, weight, eps)
        return kernels.rms_norm(x, weight, eps)

    def add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        *,
        pre_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights = (weight,) if pre_weight is None else (weight, pre_weight)
        reason = self._norm_unfit(x, *weights, residual=residual) or self._switched_off("add_rms_norm", x)
        if reason is not None:
            self.fallback("add_rms_norm", reason)
            return self._reference.add_rms_norm(x, residual, weight, eps, pre_weight=pre_weight)
        return kernels.add_rms_norm(x, residual, weight, eps, pre_weight=pre_weight)

    def layer_norm_modulate(
        self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
    ) -> torch.Tensor:
        reason = self._unfit(x, scale, shift)
        if reason is None:
            b, _, dim = x.shape if x.dim() == 3 else (0, 0, 0)
            if x.dim() != 3 or any(m.dim() != 3 or m.shape[1:] != (1, dim) for m in (scale, shift)):
                reason = f"x {tuple(x.shape)}, scale {tuple(scale.shape)}, shift {tuple(shift.shape)}"
            elif any(m.shape[0] not in (1, b) for m in (scale, shift)):
                reason = f"scale/shift batch {scale.shape[0]}, {shift.shape[0]} for x batch {b}"
            elif dim > kernels.MAX_NORM_DIM:
                reason = f"dim {dim} (kernel holds rows up to {kernels.MAX_NORM_DIM})"
        reason = reason or self._switched_off("layer_norm_modulate", x)
        if reason is not None:
            self.fallback("layer_norm_modulate", reason)
            return self._reference.layer_norm_modulate(x, scale, shift, eps)
        return kernels.layer_norm_modulate(x, scale, shift, eps)

    # ------------------------------------------------------------------ rotary embeddings

    def rotary_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        reason = self._unfit(x, strided=(x, cos, signed_sin)) or self._unfit(cos, signed_sin)
        if reason is None and cos.device != x.device:
            reason = "tables on another device"
        if reason is None:
            rot = cos.shape[-1]
            table = (x.shape[0], x.shape[1], rot) if x.dim() == 4 else None
            if (
                table is None
                or rot % 2
                or rot > x.shape[-1]
                or any(t.dim() != 3 or t.shape[-1] != rot for t in (cos, signed_sin))
                or any(
                    n not in (1, want)
                    for t in (cos, signed_sin)
                    for n, want in zip(t.shape, table, strict=True)
                )
            ):
                reason = f"x {tuple(x.shape)}, tables {tuple(cos.shape)}, {tuple(signed_sin.shape)}"
        reason = reason or self._switched_off("rotary_", x)
        if reason is not None:
            self.fallback("rotary_", reason)
            return self._reference.rotary_(x, cos, signed_sin)
        return kernels.rotary_(x, cos, signed_sin)

    def qk_norm_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        text_len: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reason = self._unfit(q, k) or self._unfit(cos, sin)
        if reason is None and cos.device != q.device:
            reason = "tables on another device"
        if reason is None:
            s, d = (q.shape[1], q.shape[3]) if q.dim() == 4 else (0, 0)
            if q.dim() != 4 or k.shape != q.shape or not 0 <= text_len <= s:
                reason = f"q {tuple(q.shape)}, k {tuple(k.shape)}, text_len {text_len}"
            elif d % 2 or d > 256:
                reason = f"head_dim {d} (kernel needs an even head_dim up to 256)"
            elif cos.shape != (s - text_len, d) or sin.shape != cos.shape:
                reason = (
                    f"tables {tuple(cos.shape)}, {tuple(sin.shape)} for {s - text_len} image tokens of {d}"
                )
        reason = reason or self._switched_off("qk_norm_rope", q)
        if reason is not None:
            self.fallback("qk_norm_rope", reason)
            return self._reference.qk_norm_rope(q, k, cos, sin, text_len, eps)
        return kernels.qk_norm_rope(q, k, cos, sin, text_len, eps)
