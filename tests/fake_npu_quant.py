"""``torch_npu.npu_weight_quant_batchmatmul`` as documented, in plain torch, for the fake torch_npu.

Written from the documentation (hiascend.com "torch_npu.npu_weight_quant_batchmatmul", Pytorch
6.0.0 / 7.0.0 API reference, Atlas A2), not from ``glm_image.ops``; where they disagree, the
backend is wrong:

    npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None,
        quant_scale=None, quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0)

- x: float16 / bfloat16, two dims (M, K); a transposed non-contiguous tensor is allowed.
- weight: int8 (or int32 carrying int4, packed by npu_convert_weight_to_int4pack: not emulated),
  two dims (K, N); a transposed non-contiguous view is allowed (recommended per channel).
- antiquant_scale: float16 / bfloat16 of x's dtype, (N,), (1, N) or (1,) (per tensor), or per
  group (ceil(K / antiquant_group_size), N); antiquant_offset: the same shapes and dtype.
- the weight is dequantized as ``(weight + antiquant_offset) * antiquant_scale``, then
  ``y = x @ weight + bias``, returned in x's dtype (quant_scale set: int8 output, not emulated).

The numerics of the real kernel (its accumulation order and rounding) are not documented: this
emulation computes in float32 and rounds once.
"""

from __future__ import annotations

import torch
from fake_torch_npu import _HALF, _require, make_module

__all__ = ["make_quant_module", "npu_weight_quant_batchmatmul"]


def _per_column(t: torch.Tensor, k: int, n: int, group: int, name: str) -> torch.Tensor:
    """A documented scale / offset shape -> (K, N), the value for each weight element."""
    if group:
        rows = -(-k // group)
        _require(tuple(t.shape) == (rows, n), f"{name} per group must be ({rows}, {n}), got {tuple(t.shape)}")
        return t.float().repeat_interleave(group, dim=0)[:k]
    _require(
        tuple(t.shape) in ((n,), (1, n), (1,)), f"{name} must be (N,), (1, N) or (1,), got {tuple(t.shape)}"
    )
    return t.float().reshape(1, -1).expand(k, n)


def npu_weight_quant_batchmatmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    quant_scale: torch.Tensor | None = None,
    quant_offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    inner_precise: int = 0,
) -> torch.Tensor:
    _require(x.dtype in _HALF, f"x must be float16/bfloat16, got {x.dtype}")
    _require(x.dim() == 2 and weight.dim() == 2, "x and weight must be two-dimensional (M, K), (K, N)")
    if weight.dtype == torch.int32:
        raise NotImplementedError("int4 packed in int32 (npu_convert_weight_to_int4pack) is not emulated")
    _require(weight.dtype == torch.int8, f"weight must be int8 or int32, got {weight.dtype}")
    k, n = weight.shape
    _require(x.shape[1] == k, f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: K differs")
    _require(antiquant_scale.dtype == x.dtype, "antiquant_scale must have x's dtype (float16/bfloat16)")
    if quant_scale is not None or quant_offset is not None:
        raise NotImplementedError("quantized (int8) output is not emulated")
    _require(antiquant_group_size == 0 or antiquant_group_size % 32 == 0, "group size: a multiple of 32")
    w = weight.float()
    if antiquant_offset is not None:
        _require(
            antiquant_offset.dtype == antiquant_scale.dtype, "antiquant_offset must match the scale's dtype"
        )
        w = w + _per_column(antiquant_offset, k, n, antiquant_group_size, "antiquant_offset")
    w = w * _per_column(antiquant_scale, k, n, antiquant_group_size, "antiquant_scale")
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def make_quant_module(**kwargs):
    """``fake_torch_npu.make_module(**kwargs)`` with ``npu_weight_quant_batchmatmul`` added."""
    module = make_module(**kwargs)
    module.npu_weight_quant_batchmatmul = npu_weight_quant_batchmatmul
    return module
