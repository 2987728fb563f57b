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
- ``int8-w8a8`` (CUDA, int8 weights that allow it (``QuantWeight.w8a8``: the DiT's; the AR's
  stay weight-only, ``quant.linear.W8A8_MODELS``), more than ``MAX_QUANT_ROWS`` rows): W8A8.
  The activations are quantized per token in one pass (``glm_image_kernels.quantize_rows``:
  codes round(x / s), s = max|row| / 127), multiplied by ``torch._int_mm`` (cuBLASLt int8 tensor
  cores, exact int32 sums), and scaled by one fused epilogue (``scale_int32``: ``acc * s *
  w_scale + bias``, rounded once to x's dtype). ``_int_mm`` takes more than 16 rows and K, N
  multiples of 8: fewer rows are padded with zero rows (sliced off), other widths and K past
  133,000 (int32 overflow) are refused. Decoding (``MAX_QUANT_ROWS`` rows or fewer) never takes
  it (nor does the AR), so Jacobi and sequential decoding keep weight-only numerics. A row's output depends on
  that row alone (its own scale, exact integer sums, an element-wise epilogue): padding and
  batch-mates change none of its bits.
- ``scaled-mm`` (fp8; CUDA, and the CPU, where torch has the same op, for the tests): W8A8. The
  same one-pass quantization to e4m3 (s = max|row| / 448) on CUDA (on the CPU its torch twin,
  the same bits), then row-wise ``torch._scaled_mm`` (scale_a (M, 1), scale_b (1, N), bfloat16
  out, the bias in its epilogue when bfloat16); on CUDA the rows are padded to a multiple of 16.

W8A8's numerics (issue 24): the activations are rounded too, so these paths leave the
weight-only reference by that rounding. Measured with the CPU twins on random rows (x ~ N(0, 1),
w ~ N(0, 1/K), K = 4096 and 16384, 149-256 rows): ``int8-w8a8`` lands within 0.9-1.1% of the
output's largest value (1.2-1.7% of a row's own), ``scaled-mm`` within 2.4-2.8% (3.5-4.4%): the
self-check holds them to ``W8A8_TOLERANCE`` (1e-3, 3e-2) and ``FP8_TOLERANCE`` (1e-3, 6e-2),
while a wrong scale or layout is off by the order of the values. With outlier channels (8 of
4096 channels 30x the rest, as LLM and DiT activations have) int8 falls to 9-17% while e4m3
stays at 2.3-2.7%: an int8 row's step is set by its largest element (LLM.int8(), SmoothQuant).
So int8 W8A8 needs ``bench quality`` on the released weights; e4m3 is what peers ship W8A8 in
(W8A8 FP8 with fused activation quantization: 1.16x per step on CogVideoX-5B; GLM-Image in
vLLM-Omni 1.17x end to end).

Why, and the alternatives: on an H200 one DiT CFG step at 1024x1024 took 18.2 ms with int8 (the
weight dequantized, then a bf16 GEMM) and 16.4 ms with fp8 (five unfused float32 passes of
activation quantization per linear) against 13.6 ms in bf16. The field's other ways, which
``benchmarks/bench_w8a8.py`` times against bf16 ``F.linear`` in the same run at the DiT's widths
and 8192 rows: torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` and
``Int8DynamicActivationInt8WeightConfig`` (the same maths; fast fp8 accumulation by default,
activation quantization unfused unless compiled), ``torch.compile`` of the W8A8 linear written
in torch ops (Inductor fuses the quantization; with max-autotune it may emit a Triton GEMM with
the scaling in its epilogue), fp8 ``use_fast_accum``, and each GEMM on ready codes (the floor:
what quantization and epilogue cost). One risk for int8: ``torch._int_mm`` calls cuBLASLt
without a workspace, which picked Ampere-era kernels on a GB300 (pytorch issue 187094); whether
it beats bf16 on an H100 / H200 is the benchmark's first question. No GPU was available when
these paths were written: nothing here is timed, and which way is kept awaits that run.

Backend paths: ``triton`` adds its int8/int4 decode GEMM, up to ``MAX_QUANT_ROWS`` rows
(``glm_image_kernels.quant_linear``); ``npu`` adds ``npu_weight_quant_batchmatmul`` for int8
(``npu_ops``). On CUDA, past the decode GEMM's rows, int4 and the AR's weight-only int8 (and the
DiT's int8 where ``int8-w8a8`` cannot take the shape) dequantize the weight into the activations'
dtype and run a tensor-core GEMM (the reference): the AR's prefill, a small share of its time. int4 on a CPU has no fast path
(torch's CPU int4 kernel wants a layout that depends on the CPU's vector width): it runs the
reference, saving memory, not time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from glm_image_kernels import (
    HAVE_TRITON,
    MAX_QUANT_ROWS,
    QuantWeight,
    quantize_rows,
    quantize_rows_reference,
    scale_int32,
    scale_int32_reference,
)

__all__ = ["FP8_TOLERANCE", "QUANTIZED_TOLERANCES", "TORCH_PATHS", "W8A8_TOLERANCE", "QuantPath"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_SPLIT_ROWS = 1024  # activation rows per _int_mm call of int8-split
_INT8PACK_ROWS = 16  # int8pack serves up to this many rows, int8-split more (its own limit, not the GEMV's)
MIN_GEMM_ROWS = 16  # int8-float: fewer rows take another GEMM kernel, which rounds otherwise
_FLOAT_ELEMENTS = 1 << 22  # int8-float: weight elements converted to float32 at once (16 MiB)
_INVARIANT: list[bool] = []  # rows_invariant's verdict, once per process
# (atol, rtol) of the fp8 path against the reference: its activations keep e4m3's 3 mantissa
# bits (2**-4 relative per element), so its outputs differ by ~1% of their scale; a wrong scale
# or layout is off by the order of the values.
FP8_TOLERANCE = (1e-3, 6e-2)
# (atol, rtol) of int8-w8a8: per-token int8 activations err by up to half a step (max|row| / 254)
# per element; on the self-check's random rows its outputs land within ~1% of the output scale
# of the weight-only reference (measured: see the module docstring); a wrong scale or layout
# is off by the order of the values.
W8A8_TOLERANCE = (1e-3, 3e-2)
# the self-check's tolerance of a path whose activations are quantized (its ``precision``)
QUANTIZED_TOLERANCES = {torch.float8_e4m3fn: FP8_TOLERANCE, torch.int8: W8A8_TOLERANCE}
_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA takes more than 16 rows


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
    if x.shape[0] > _INT8PACK_ROWS:
        return f"more than {_INT8PACK_ROWS} rows (int8-float serves those)"
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
    if x.shape[0] <= _INT8PACK_ROWS:
        return f"{_INT8PACK_ROWS} rows or fewer (int8pack serves those)"
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


# ---------------------------------------------------------------------- W8A8 (per-token activations)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _quantize_rows(x: torch.Tensor, kind: str, rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes (R, K) and scales (R,), R = max(M, rows): the fused kernel on CUDA, its
    twin elsewhere (the same bits: tests/test_w8a8.py)."""
    if x.is_cuda and HAVE_TRITON:
        return quantize_rows(x, kind, rows)
    return quantize_rows_reference(x, kind, rows)


def _w8a8_unfit(x: torch.Tensor, weight: QuantWeight) -> str | None:
    if not weight.w8a8:
        return "a weight-only linear (W8A8 serves the DiT's int8 linears; the AR's keep weight-only numerics)"
    if x.device.type != "cuda":
        return f"{x.device.type} tensors (a CUDA path; int8-float serves the CPU)"
    if x.shape[0] <= MAX_QUANT_ROWS:
        return f"{MAX_QUANT_ROWS} rows or fewer (decoding keeps weight-only numerics)"
    if weight.in_features % 8 or weight.out_features % 8:
        return "in or out features not a multiple of 8 (torch._int_mm needs it)"
    if weight.in_features * 127 * 127 >= 2**31:
        return f"{weight.in_features} input features (the int32 sums could overflow)"
    if not weight.data.is_contiguous():
        return "a weight that is not contiguous (torch._int_mm reads its rows as columns)"
    return _common_unfit(x, weight)


def _w8a8(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    m = x.shape[0]
    # zero rows pad to torch._int_mm's minimum on CUDA: a row's codes, its int32 sums (exact)
    # and its epilogue depend on that row alone, so padding changes no real row
    codes, scale = _quantize_rows(_unit_stride(x), "int8", _INT_MM_MIN_ROWS)
    acc = torch._int_mm(codes, weight.data.t())  # (R, K) @ (K, N) int8 -> (R, N) int32
    epilogue = scale_int32 if x.is_cuda and HAVE_TRITON else scale_int32_reference
    return epilogue(acc[:m], scale, weight.scale, bias, x.dtype)


def _scaled_mm_unfit(x: torch.Tensor, weight: QuantWeight) -> str | None:
    if x.device.type not in ("cuda", "cpu"):
        return f"{x.device.type} tensors (torch._scaled_mm runs on CUDA and the CPU)"
    if x.device.type == "cuda" and (weight.in_features % 16 or weight.out_features % 16):
        return "in or out features not a multiple of 16 (cuBLASLt FP8 needs it)"
    return _common_unfit(x, weight)


def _scaled_mm(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    m = x.shape[0]
    rows = -(-m // 16) * 16 if x.is_cuda else m  # CUDA: zero rows pad to a multiple of 16
    xq, scale = _quantize_rows(_unit_stride(x), "fp8", rows)  # (R, K) per-token e4m3, (R,)
    # bfloat16 out: what row-wise _scaled_mm takes on every CUDA build (CUTLASS or cuBLASLt); the
    # bias joins its float32 epilogue where it is bfloat16 too, else it is added after
    fused = bias is not None and bias.dtype == torch.bfloat16
    y = torch._scaled_mm(
        xq,
        weight.data.t(),  # column-major (the weight's rows)
        scale_a=scale[:, None],  # (R, 1) float32
        scale_b=weight.scale[None, :],  # (1, N) float32
        bias=bias if fused else None,
        out_dtype=torch.bfloat16,
    )
    y = y[:m].to(x.dtype)
    return y if fused else _add_bias(y, bias)


TORCH_PATHS = (
    # int8-float first, for every row count: one path, so a row's bits never depend on its batch
    QuantPath("int8-float", ("int8",), _float_unfit, _float),
    QuantPath("int8pack", ("int8",), _int8pack_unfit, _int8pack, torch.bfloat16),
    QuantPath("int8-split", ("int8",), _split_unfit, _split, torch.float16),
    QuantPath("int8-w8a8", ("int8",), _w8a8_unfit, _w8a8, torch.int8),
    QuantPath("scaled-mm", ("fp8",), _scaled_mm_unfit, _scaled_mm, torch.float8_e4m3fn),
)
