"""The quantized linear op family (``Ops.quant_linear``): which implementation runs, per device.

Every implementation computes ``x @ dequantize(weight)^T + bias`` and is held to the reference
``quant_linear_reference`` (dequantize, then ``F.linear``; ``glm_image_kernels.quant_linear``) by
the self-check (``selfcheck.verify_quant``) before it serves a (device, dtype, format). A backend
lists its paths in order (``Ops.quant_paths``); the first that takes the inputs and passed its
check runs, and the reference serves whatever none takes.

Measured on this project's CPU (AMD EPYC Zen 4, AVX-512 VNNI / BF16, shared with other jobs), one
13696x4096 GEMV, one thread, best of 15 (``benchmarks/bench_quant.py gemv``): float32 dense
13.2 ms, bfloat16 dense 10.9 ms, float16 dense 6.2 ms, ``int8pack`` 4.7 ms, ``int8-split`` at one
row 20.3 ms, the int4 reference (dequantize + linear) 513 ms; torchao 0.18's
``Int8WeightOnlyConfig`` 68.6 ms against 10.1 ms for bfloat16 dense in the same run (7x slower),
so it is not used.

torch's own quantized matmuls (every backend; the ``sdpa`` backend has only these):

- ``int8pack`` (CPU, int8; no longer chosen, kept for the benchmarks): ``torch._weight_int8pack_mm``,
  which takes bfloat16 activations (float32 ones take a path 20x slower) and rounds its output
  to bfloat16: W8A16. Faster than ``int8-float`` for decode (1-16 rows), but a row's bits then
  depend on whether its batch has more than 16 rows, and its bfloat16 partial sums break
  tensor parallelism (below).
- ``int8-float`` (CPU, int8, every row count and activation dtype):
  the codes converted to float32 a block of output channels at a time, one float32 GEMM, the
  per-channel scale applied to the product (``(x @ q^T) * scale``). Issue 30: float32 maths end
  to end, so a tensor-parallel row shard's partial sums add up like the unsharded product's (the
  bfloat16 output of ``int8pack`` rounds each partial: ``--ar-tp 2`` greedy int8 wrote other
  tokens than one process, 82% of them on tiny, though the shards hold the whole weight's
  codes and scales), and at float32 GEMM speed for prefill and the DiT (``int8-split``'s
  ``torch._int_mm`` takes 56 s for 512x4096 @ 4096x4096 on an AVX2 CPU, 240x float32).
  Rows go at least ``MIN_GEMM_ROWS`` at once (zero rows pad a smaller call): torch's float32
  GEMM rounds a row of 1-7 rows otherwise than the same row among more, so a decode step would
  depend on the batch; from 16 rows on a row's result does not depend on the row count (checked
  at first use, ``rows_invariant``; where it does, every call goes in blocks of exactly 16).
- ``int8-split`` (CPU, int8; no longer chosen, ``int8-float`` serves its rows; kept for the
  benchmarks): ``torch._int_mm`` (VNNI int8 dot products)
  on the activations split into two int8 terms per row, ``x ~ s * (hi + lo / 254)`` with ``s =
  max|row| / 127``, so the activations keep ~16 bits (relative error <= 2**-16 of the row's max)
  and the products are exact int32: weight-only int8 maths at int8 speed (0.63x the time of
  float32 dense at 512-2048 rows here, about bfloat16 dense's). Rows go 1024 at a time to bound
  the int32 temporaries.
- ``scaled-mm`` (fp8; CUDA, and the CPU, where torch has the same op, for the tests):
  ``torch._scaled_mm`` with the weight's per-row scales and per-token dynamic activation scales
  (e4m3, ``max|row| / 448``); on CUDA the rows are padded to a multiple of 16.

Backend paths: ``triton`` adds its int8/int4 GEMV for decode (``glm_image_kernels.quant_linear``);
``npu`` adds ``npu_weight_quant_batchmatmul`` for int8 (``npu_ops``). On CUDA a batch of more than
16 rows dequantizes the weight into the activations' dtype and runs a tensor-core GEMM (the
reference: compute-bound there, the dequantization is a small part). int4 on a CPU has no fast
path (torch's CPU int4 kernel wants a layout that depends on the CPU's vector width): it runs the
reference, saving memory, not time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from glm_image_kernels import MAX_QUANT_ROWS, QuantWeight

from ..quant.formats import FP8_MAX

__all__ = ["FP8_TOLERANCE", "TORCH_PATHS", "QuantPath"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_SPLIT_ROWS = 1024  # activation rows per _int_mm call of int8-split
MIN_GEMM_ROWS = 16  # int8-float: fewer rows take another GEMM kernel, which rounds otherwise
_FLOAT_ELEMENTS = 1 << 22  # int8-float: weight elements converted to float32 at once (16 MiB)
_INVARIANT: list[bool] = []  # rows_invariant's verdict, once per process
# (atol, rtol) of the fp8 path against the reference: its activations keep e4m3's 3 mantissa
# bits (2**-4 relative per element), so its outputs differ by ~1% of their scale; a wrong scale
# or layout is off by the order of the values.
FP8_TOLERANCE = (1e-3, 6e-2)


@dataclass(frozen=True)
class QuantPath:
    """One implementation of ``quant_linear`` over 2-D activations (M, K)."""

    name: str
    kinds: tuple[str, ...]
    # why it cannot take these inputs (x (M, K), weight), or None
    unfit: Callable[[torch.Tensor, QuantWeight], str | None]
    run: Callable[[torch.Tensor, QuantWeight, torch.Tensor | None], torch.Tensor]
    # the precision its activations are computed in (None: x's dtype): the self-check's tolerance
    precision: torch.dtype | None = None


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _common_unfit(x: torch.Tensor, weight: QuantWeight) -> str | None:
    if x.dtype not in _FLOATS:
        return f"activations in {x.dtype}"
    if x.shape[1] != weight.in_features:
        return f"x of {x.shape[1]} features for a weight of {weight.in_features}"
    if torch.is_grad_enabled() and x.requires_grad:
        return "inputs that need gradients (inference only)"
    return None


# ---------------------------------------------------------------------- CPU int8


def _int8pack_unfit(x: torch.Tensor, weight: QuantWeight) -> str | None:
    if x.device.type != "cpu":
        return f"{x.device.type} tensors (a CPU kernel)"
    if x.shape[0] > MAX_QUANT_ROWS:
        return f"more than {MAX_QUANT_ROWS} rows (int8-float serves those)"
    return _common_unfit(x, weight)


def _int8pack(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    # (M, K) bf16 @ int8 (N, K)^T * scale (N,) bf16 -> (M, N) bf16
    y = torch._weight_int8pack_mm(
        x.to(torch.bfloat16).contiguous(), weight.data, weight.scale.to(torch.bfloat16)
    )
    return _add_bias(y.to(x.dtype), bias)


def rows_invariant() -> bool:
    """Whether this CPU's float32 GEMM gives a row the same bits among 16, 17, 33 or 100 rows
    (measured once: it depends on the kernels torch picks for this CPU)."""
    if not _INVARIANT:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(100, 256, generator=g), torch.randn(320, 256, generator=g)
        whole = x @ w.T
        _INVARIANT.append(all(torch.equal(x[:m] @ w.T, whole[:m]) for m in (16, 17, 33)))
    return _INVARIANT[0]


def _float_unfit(x: torch.Tensor, weight: QuantWeight) -> str | None:
    if x.device.type != "cpu":
        return f"{x.device.type} tensors (a CPU path)"
    return _common_unfit(x, weight)


def _float(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    m, n = x.shape[0], weight.out_features
    xf = x.float()
    if m < MIN_GEMM_ROWS:
        xf = torch.cat([xf, xf.new_zeros(MIN_GEMM_ROWS - m, xf.shape[1])])
    blocks = [xf] if rows_invariant() else list(xf.split(MIN_GEMM_ROWS))
    if not rows_invariant() and blocks[-1].shape[0] < MIN_GEMM_ROWS:
        blocks[-1] = torch.cat([blocks[-1], xf.new_zeros(MIN_GEMM_ROWS - blocks[-1].shape[0], xf.shape[1])])
    out = torch.empty((sum(b.shape[0] for b in blocks), n), dtype=torch.float32, device=x.device)
    step = max(1, _FLOAT_ELEMENTS // weight.in_features)
    for start in range(0, n, step):
        w = weight.data[start : start + step].float().T  # (K, n) exact: the codes are small integers
        row = 0
        for block in blocks:
            torch.mm(block, w, out=out[row : row + block.shape[0], start : start + step])
            row += block.shape[0]
    y = (out[:m] * weight.scale).to(x.dtype)
    return _add_bias(y, bias)


def _split_unfit(x: torch.Tensor, weight: QuantWeight) -> str | None:
    if x.device.type != "cpu":
        return f"{x.device.type} tensors (a CPU kernel)"
    if x.shape[0] <= MAX_QUANT_ROWS:
        return f"{MAX_QUANT_ROWS} rows or fewer (int8pack serves those)"
    if weight.in_features * 127 * 127 >= 2**31:
        return f"{weight.in_features} input features (the int32 sums could overflow)"
    return _common_unfit(x, weight)


def _split(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    outs = []
    for rows in x.split(_SPLIT_ROWS):
        xf = rows.float()  # (m, K)
        s = xf.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
        hi = torch.round(xf / s)
        lo = torch.round((xf - hi * s) * (254 / s))  # |x - hi * s| <= s / 2: lo in [-127, 127]
        acc = torch._int_mm(torch.cat([hi, lo]).to(torch.int8), weight.data.t())  # (2m, N) int32
        m = rows.shape[0]
        outs.append(((acc[:m].float() + acc[m:].float() / 254) * s * weight.scale).to(x.dtype))
    return _add_bias(torch.cat(outs) if len(outs) > 1 else outs[0], bias)


# ---------------------------------------------------------------------- fp8


def _scaled_mm_unfit(x: torch.Tensor, weight: QuantWeight) -> str | None:
    if x.device.type not in ("cuda", "cpu"):
        return f"{x.device.type} tensors (torch._scaled_mm runs on CUDA and the CPU)"
    if x.device.type == "cuda" and (weight.in_features % 16 or weight.out_features % 16):
        return "in or out features not a multiple of 16 (cuBLASLt FP8 needs it)"
    return _common_unfit(x, weight)


def _scaled_mm(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    m = x.shape[0]
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    xq = (xf / scale).to(torch.float8_e4m3fn)  # (M, K) per-token e4m3
    if x.device.type == "cuda" and m % 16:
        pad = 16 - m % 16
        xq = torch.cat([xq, xq.new_zeros((pad, xq.shape[1]))])
        scale = torch.cat([scale, scale.new_ones((pad, 1))])
    # row-wise scaling: scale_a (M, 1), scale_b (1, N), float32; mat2 column-major (the weight's rows)
    y = torch._scaled_mm(
        xq, weight.data.t(), scale_a=scale, scale_b=weight.scale[None, :], out_dtype=torch.bfloat16
    )
    return _add_bias(y[:m].to(x.dtype), bias)


TORCH_PATHS = (
    # int8-float first, for every row count: one path, so a row's bits never depend on its batch
    QuantPath("int8-float", ("int8",), _float_unfit, _float),
    QuantPath("int8pack", ("int8",), _int8pack_unfit, _int8pack, torch.bfloat16),
    QuantPath("int8-split", ("int8",), _split_unfit, _split, torch.float16),
    QuantPath("scaled-mm", ("fp8",), _scaled_mm_unfit, _scaled_mm, torch.float8_e4m3fn),
)
