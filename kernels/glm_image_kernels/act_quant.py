"""Per-token activation quantization for W8A8 GEMMs, and the int8 GEMM's scaling epilogue.

A W8A8 linear quantizes its activations on the fly, one scale per row (token), so the GEMM runs
on int8 or fp8 tensor cores; the weight carries one scale per output channel (``QuantWeight``):

    codes[m, k] = round(x[m, k] / s[m]),   s[m] = max(max_k |x[m, k]| / QMAX, FLT_MIN)
    out[m, n]   = (sum_k codes[m, k] * wq[n, k]) * s[m] * ws[n] + bias[n]

with QMAX 127 for int8 (round to nearest, ties to even, codes in [-127, 127]) and 448 for
float8 e4m3 (round to the nearest e4m3 value, ties to even). The clamp from below keeps an
all-zero row at scale FLT_MIN and codes 0 (not 0/0); a row holding inf or NaN gets a non-finite
scale, so its output row is non-finite too (the engine treats that as an error, not an image).

Why kernels: in torch the quantization is five passes over the activations in float32 (abs,
amax, divide, round or cast, the code tensor), each writing a full-size temporary; the int8
GEMM's scaling is three more over its int32 product (convert, two scales, the bias, the cast).
``quantize_rows`` reads a row, keeps its maximum, reads it again (from L2: a row of 4096 bf16
is 8 KiB) and writes codes and scale: one read of x from memory, one write of the codes, as the
fused "dynamic per-token quant" kernels of vLLM (``dynamic_scaled_int8_quant``) and torchao do.
``scale_int32`` reads the int32 product once and writes the output in x's dtype.

Grids: ``quantize_rows`` (M,), one program per row, walking K in blocks of at most ``MAX_BLOCK``
(twice: the maximum, then the codes); ``scale_int32`` (cdiv(M, 32), cdiv(N, 128)).

Exactness: the twins are the contract, bit for bit. The kernel divides with IEEE rounding
(``div_rn``, as torch), rounds to an integer with the 1.5 * 2**23 trick (adding it leaves no
fraction bits: round to nearest even, with no library call, so Triton's interpreter runs the
same code) and, for e4m3, rounds the value to its e4m3 step in float32 itself (the step is a
power of two read off the exponent) so that the cast stores an exact value: the interpreter's
own float8 cast rounds ties away from zero, the GPU's to even. Checked over all e4m3 values,
their midpoints and random rows (tests/test_w8a8.py).
"""

from __future__ import annotations

import torch

from ._triton import cdiv, next_power_of_2, require_triton, tl, triton

__all__ = [
    "QMAX",
    "quantize_rows",
    "quantize_rows_reference",
    "scale_int32",
    "scale_int32_reference",
]

QMAX = {"int8": 127.0, "fp8": 448.0}  # the largest code of each format
CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
MAX_BLOCK = 4096  # activations a quantize program holds at once (16 KiB of float32)
_TINY = torch.finfo(torch.float32).tiny  # FLT_MIN: the smallest scale
_EPILOGUE_BLOCK = (32, 128)  # scale_int32's (rows, columns) per program


@triton.jit
def _max_nan(a, b):
    # a NaN anywhere in the row makes the row's maximum (and scale) NaN, as torch's amax
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_even(v):
    # v + 1.5 * 2**23 lies in [2**23, 2**24), where float32 has no fraction bits: the add rounds
    # v to an integer, ties to even (|v| < 2**22)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_e4m3(v):
    # v in [-448, 448] -> the nearest float8 e4m3 value, ties to even, still float32. The step
    # of e4m3 at |v| is 2**(exponent - 3), and 2**-9 below 2**-6 (its subnormals).
    mag = tl.abs(v)
    exponent = tl.maximum(mag.to(tl.int32, bitcast=True) >> 23, 121)  # biased; 121: 2**-6
    step = ((exponent - 3) << 23).to(tl.float32, bitcast=True)
    inverse = ((257 - exponent) << 23).to(tl.float32, bitcast=True)  # 1 / step
    rounded = _round_even(mag * inverse) * step  # powers of two: exact but for the rounding
    return tl.where(v.to(tl.int32, bitcast=True) < 0, -rounded, rounded)  # keeps -0.0


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    k,
    sx_m,
    QMAX: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row * sx_m
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, k, BLOCK):
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < k, other=0.0).to(tl.float32)
        amax = _max_nan(amax, tl.abs(x))
    top = tl.reduce(amax, 0, _max_nan)
    scale = tl.maximum(tl.math.div_rn(top, QMAX), 1.1754943508222875e-38)  # FLT_MIN
    scale = tl.where(top != top, top, scale)  # NaN stays NaN through the clamp
    tl.store(scales_ptr + row, scale)
    for k0 in range(0, k, BLOCK):
        ok = k0 + cols < k
        x = tl.load(x_row + k0 + cols, mask=ok, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
        code = _round_e4m3(v).to(tl.float8e4nv) if FP8 else _round_even(v).to(tl.int8)
        tl.store(codes_ptr + row * k + k0 + cols, code, mask=ok)


def _check_kind(kind: str) -> None:
    if kind not in QMAX:
        raise ValueError(f"activation codes are {' or '.join(QMAX)}, not {kind!r}")


def _padded(x: torch.Tensor, kind: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (rows, K) and scales (rows,) with the rows past x's zero codes and scale 1."""
    m, k = x.shape
    codes = torch.empty((max(rows, m), k), dtype=CODE_DTYPES[kind], device=x.device)
    scales = torch.empty((max(rows, m),), dtype=torch.float32, device=x.device)
    codes[m:].zero_()  # dtype-agnostic zero: float8's and int8's zero are both all-zero bits
    scales[m:] = 1.0
    return codes, scales


def quantize_rows(
    x: torch.Tensor, kind: str, rows: int = 0, *, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float16 / bfloat16 / float32 with a unit last stride -> (codes (R, K) int8 or
    float8_e4m3fn, scales (R,) float32), R = max(M, ``rows``): the rows past M (padding for
    GEMMs that want more or aligned rows) have zero codes and scale 1. ``kind``: int8 or fp8.
    ``block``: activations per step along K, a power of two (default: K's, up to ``MAX_BLOCK``)."""
    require_triton()
    _check_kind(kind)
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be (M, K) with a unit last stride, got {tuple(x.shape)} {x.stride()}")
    codes, scales = _padded(x, kind, rows)
    m, k = x.shape
    if m == 0 or k == 0:
        scales[:m] = _TINY
        return codes, scales
    block = block or min(next_power_of_2(k), MAX_BLOCK)
    _quantize_rows_kernel[(m,)](
        x,
        codes,
        scales,
        k,
        x.stride(0),
        QMAX=QMAX[kind],
        FP8=kind == "fp8",
        BLOCK=block,
        num_warps=max(1, min(8, block // 256)),
    )
    return codes, scales


def quantize_rows_reference(x: torch.Tensor, kind: str, rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin of ``quantize_rows`` (and what runs where the kernel cannot): x (M, K) ->
    (codes (R, K), scales (R,) float32), R = max(M, ``rows``); see the module docstring."""
    _check_kind(kind)
    codes, scales = _padded(x, kind, rows)
    m, k = x.shape
    xf = x.float()
    amax = xf.abs().amax(dim=1) if k else xf.new_zeros(m)
    scale = (amax / QMAX[kind]).clamp_min(_TINY)  # NaN stays NaN (clamp_min propagates it)
    v = (xf / scale[:, None]).clamp(-QMAX[kind], QMAX[kind])
    codes[:m] = torch.round(v) if kind == "int8" else v
    scales[:m] = scale
    return codes, scales


@triton.jit
def _scale_int32_kernel(
    acc_ptr,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    m,
    n,
    sa_m,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < m, cols < n
    ok = row_ok[:, None] & col_ok[None, :]
    acc = tl.load(acc_ptr + rows[:, None].to(tl.int64) * sa_m + cols[None, :], mask=ok, other=0)
    xs = tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)
    ws = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * n + cols[None, :], y, mask=ok)


def scale_int32(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The int8 W8A8 GEMM's epilogue: acc (M, N) int32 (unit last stride), x_scale (>= M,) and
    w_scale (N,) float32, bias (N,) or None -> ``acc * x_scale[:, None] * w_scale + bias`` in
    float32, rounded once to ``dtype``; (M, N), contiguous."""
    require_triton()
    m, n = acc.shape
    if acc.stride(-1) != 1:
        raise ValueError(f"acc must have a unit last stride, got {acc.stride()}")
    out = torch.empty((m, n), dtype=dtype, device=acc.device)
    if out.numel() == 0:
        return out
    bm, bn = _EPILOGUE_BLOCK
    _scale_int32_kernel[(cdiv(m, bm), cdiv(n, bn))](
        acc,
        x_scale,
        w_scale,
        bias if bias is not None else w_scale,
        out,
        m,
        n,
        acc.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=4,
    )
    return out


def scale_int32_reference(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The twin of ``scale_int32``: float32 maths in the same order, one rounding to ``dtype``."""
    y = acc.float() * x_scale[: acc.shape[0], None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)
