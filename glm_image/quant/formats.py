"""Weight formats as pure functions: a float weight (out, in) in, a ``QuantWeight`` out.

The formats, their layouts and their dequantization are defined once, beside the kernels that
read them (``glm_image_kernels.quant_linear``: ``QuantWeight.dequantize``); this module makes them.

- ``int8``: symmetric, one float32 scale per output channel: ``w ~ q * scale``, q in [-127, 127],
  scale = max|row| / 127. Errs by at most scale / 2 per element (half a step).
- ``int4``: asymmetric, one scale and one offset per group of ``group`` input channels of a row:
  ``w ~ (q - 8) * scale + zero``, q in [0, 15], scale = (max - min) / 15, zero = min + 8 * scale
  (torch's and Ascend's int4 matmuls use this affine form). Two codes per byte: 4 bits per weight
  plus 2 x 16 bits per group (scale and zero are stored in bfloat16, which the 4-bit kernels take).
  The codes are rounded against the stored bfloat16 scale and zero, so an element errs by at
  most half the stored step, except at a group's ends, where bfloat16's rounding of scale and zero
  can push the range by up to ``2**-8 * (|zero| + 8 * scale)`` (see ``int4_error_bound``).
- ``fp8``: float8 e4m3 with one float32 scale per output channel, scale = max|row| / 448, so the
  largest element of a row is exact and the others keep e4m3's 3 mantissa bits (relative error
  at most 2**-4, or scale * 2**-9 for the subnormals below 2**-6).

An all-zero row or group gets scale 1 (q = 0, or code 8 = zero), not 0/0. Weights are quantized
a block of rows at a time (``CHUNK`` elements), so converting one layer needs only tens of MB
of float32 temporaries besides the weight itself (the loader quantizes each tensor as it reads it, on the device).
"""

from __future__ import annotations

import torch
from glm_image_kernels import QuantWeight

__all__ = [
    "FP8_MAX",
    "INT4_GROUPS",
    "QuantWeight",
    "default_group",
    "int4_error_bound",
    "quantize",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "shard_columns",
]

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
INT4_GROUPS = (128, 64, 32)  # group sizes tried in order: the largest that divides the row
CHUNK = 1 << 22  # elements quantized at once (bounds the float32 temporaries: 16 MB each)


def _chunks(w: torch.Tensor):
    rows = max(1, CHUNK // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        yield start, w[start : start + rows].float()


def _row_scale(w: torch.Tensor, top: float) -> torch.Tensor:
    """max|row| / top, float32; 1 for an all-zero row."""
    amax = w.abs().amax(dim=1)
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def quantize_int8(w: torch.Tensor) -> QuantWeight:
    """(out, in) float -> int8 per output channel."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start, rows in _chunks(w):
        s = _row_scale(rows, 127.0)
        q[start : start + len(rows)] = torch.round(rows / s[:, None]).clamp_(-127, 127)
        scale[start : start + len(rows)] = s
    return QuantWeight("int8", q, scale)


def quantize_fp8(w: torch.Tensor) -> QuantWeight:
    """(out, in) float -> float8 e4m3 per output channel."""
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start, rows in _chunks(w):
        s = _row_scale(rows, FP8_MAX)
        q[start : start + len(rows)] = (rows / s[:, None]).clamp_(-FP8_MAX, FP8_MAX)
        scale[start : start + len(rows)] = s
    return QuantWeight("fp8", q, scale)


def default_group(in_features: int) -> int:
    """The int4 group size for rows of ``in_features``: 128 where it divides, else 64, 32."""
    for group in INT4_GROUPS:
        if in_features % group == 0:
            return group
    raise ValueError(f"in_features = {in_features}: int4 groups need a multiple of {INT4_GROUPS[-1]}")


def quantize_int4(w: torch.Tensor, group: int | None = None) -> QuantWeight:
    """(out, in) float -> 4-bit codes, two per byte, with a scale and an offset per group."""
    out, cols = w.shape
    group = group or default_group(cols)
    if cols % group or group % 2:
        raise ValueError(f"in_features = {cols} is not a multiple of the int4 group {group}")
    packed = torch.empty((out, cols // 2), dtype=torch.uint8, device=w.device)
    scale = torch.empty((out, cols // group), dtype=torch.bfloat16, device=w.device)
    zero = torch.empty_like(scale)
    for start, rows in _chunks(w):
        g = rows.view(len(rows), cols // group, group)
        low, high = g.amin(dim=-1), g.amax(dim=-1)
        s = (high - low) / 15
        s = torch.where(s > 0, s, torch.ones_like(s)).to(torch.bfloat16)  # a constant group: code 8
        z = (low + 8 * s.float()).to(torch.bfloat16)
        q = torch.round((g - z.float()[..., None]) / s.float()[..., None] + 8).clamp_(0, 15).to(torch.uint8)
        q = q.view(len(rows), cols // 2, 2)
        packed[start : start + len(rows)] = q[..., 0] | (q[..., 1] << 4)
        scale[start : start + len(rows)] = s
        zero[start : start + len(rows)] = z
    return QuantWeight("int4", packed, scale, zero, group)


def int4_error_bound(weight: QuantWeight) -> torch.Tensor:
    """(out, in / group): the most an element of each group may err by (see the module docstring)."""
    s, z = weight.scale.float(), weight.zero.float()
    return s / 2 + 2.0**-8 * (z.abs() + 8 * s)


_QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}


def quantize(w: torch.Tensor, kind: str) -> QuantWeight:
    """``w`` (out, in) in the format ``kind`` (int8, int4, fp8)."""
    return _QUANTIZERS[kind](w)


def shard_columns(w: torch.Tensor, kind: str, start: int, stop: int) -> QuantWeight:
    """Input columns [start, stop) of ``w`` (out, in) in the format ``kind``, as the shard of the
    whole weight's quantization: a row-parallel rank's part of a tensor-parallel linear.

    int8 and fp8 keep the whole row's scale, so the shard's codes and scales are exactly those of
    the unsharded weight. int4 keeps its groups where the shard's edges fall on the whole row's
    group edges; elsewhere the shard is quantized on its own (its own groups, its own bound)."""
    if kind == "int4":
        group = default_group(w.shape[1])
        if start % group or stop % group:
            return quantize_int4(w[:, start:stop])
        whole = quantize_int4(w)
        return QuantWeight(
            "int4",
            whole.data[:, start // 2 : stop // 2].contiguous(),
            whole.scale[:, start // group : stop // group].contiguous(),
            whole.zero[:, start // group : stop // group].contiguous(),
            group,
        )
    whole = quantize(w, kind)
    return QuantWeight(kind, whole.data[:, start:stop].contiguous(), whole.scale)
