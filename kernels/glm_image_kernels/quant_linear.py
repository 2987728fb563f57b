"""Weight-only quantized linear layers: the weight formats, their reference twin, and a Triton GEMV.

A quantized weight (``QuantWeight``) is one of

- ``int8``: ``data`` int8 (N, K), ``scale`` float32 (N,): ``w = data * scale[:, None]``;
- ``int4``: ``data`` uint8 (N, K / 2), two 4-bit codes per byte (the low nibble holds the even
  input channel), ``scale`` and ``zero`` bfloat16 (N, K / group): ``w = (code - 8) * scale +
  zero`` over each group of ``group`` input channels of a row (``zero`` is the value of code 8);
- ``fp8``: ``data`` float8_e4m3fn (N, K), ``scale`` float32 (N,): ``w = float(data) * scale``.

``quant_linear_reference`` is the maths every implementation is held to (the twin, and the
reference ``Ops.quant_linear`` path): dequantize to the activations' dtype, then ``F.linear``.

Why a kernel: a decode step multiplies one activation row per sequence by every weight, so it is
bound by the bytes of weights read, and the reference materialises the full-precision weight
first (more bytes than the unquantized model). ``quant_linear`` reads the int8 or int4 codes
once, dequantizes them in registers and accumulates in float32:

    out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])        rounded once, to x's dtype

Grid (M, cdiv(N, BLOCK_N)): one program per activation row and block of output channels; it
walks K in blocks (for int4, one group per block, so each block has one scale and zero per row).
It serves few rows (``MAX_ROWS``): beyond that a GEMM is compute-bound and the caller
dequantizes into a tensor-core GEMM instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import cdiv, require_triton, tl, triton

__all__ = [
    "MAX_ROWS",
    "QuantWeight",
    "quant_linear",
    "quant_linear_reference",
    "unpack_int4",
]

MAX_ROWS = 16  # activation rows the GEMV kernel serves; a GEMM beyond
DEQUANTIZE_ELEMENTS = 1 << 22  # weight elements dequantized at a time (16 MiB of float32)
# The launch per format (BLOCK_N, BLOCK_K, warps, stages): the fastest over the AR's four linears
# (4608x4096, 4096x4096, 27392x4096, 4096x13696, one row) of 48 launches on an H200
# (`benchmarks/bench_quant.py gemv --device cuda`): int8 123.5 us per layer's linears against
# 252.0 us for the first guess (32, 128, 4) and 148.1 us for dense bf16; int4 610.7 us against 995.1.
LAUNCH = {"int8": (16, 512, 8, 2), "int4": (16, 128, 4, 2)}


@dataclass(frozen=True)
class QuantWeight:
    """A quantized (out_features, in_features) weight; see the module docstring for the formats."""

    kind: str
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group: int = 0

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def in_features(self) -> int:
        return self.data.shape[1] * (2 if self.kind == "int4" else 1)

    @property
    def nbytes(self) -> int:
        tensors = [self.data, self.scale] + ([self.zero] if self.zero is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full-precision (N, K) weight, computed in float32 and rounded once to ``dtype``.
        Rows go ``DEQUANTIZE_ELEMENTS`` at a time, so the float32 temporaries stay small beside
        the result: a prefill GEMM on a GPU dequantizes the AR's widest weight (27392 x 4096), of
        which one whole float32 copy and its product would be 0.9 GB (measured on an H200)."""
        n, k = self.out_features, self.in_features
        out = torch.empty((n, k), dtype=dtype, device=self.data.device)
        step = max(1, DEQUANTIZE_ELEMENTS // k)
        for start in range(0, n, step):
            out[start : start + step] = self._rows(slice(start, start + step)).to(dtype)
        return out

    def _rows(self, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of the weight in float32."""
        if self.kind == "int4":
            codes = unpack_int4(self.data[rows]).float()  # (n, K)
            n, k = codes.shape
            groups = codes.view(n, k // self.group, self.group)
            w = (groups - 8) * self.scale[rows].float()[..., None] + self.zero[rows].float()[..., None]
            return w.view(n, k)
        return self.data[rows].float() * self.scale[rows].float()[:, None]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) uint8 -> (N, K) uint8 codes 0..15; the low nibble is the even input channel."""
    low, high = packed & 15, packed >> 4
    return torch.stack([low, high], dim=-1).view(packed.shape[0], -1)


def quant_linear_reference(
    x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The twin, and the reference ``quant_linear`` op: ``F.linear(x, weight.dequantize(x.dtype),
    bias)``. x (..., K); returns (..., N) in x's dtype."""
    return F.linear(x, weight.dequantize(x.dtype), bias)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    zero_ptr,
    bias_ptr,
    out_ptr,
    n_out,
    k_in,
    sx_m,
    sw_n,
    ss_n,
    INT4: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_in
        x = tl.load(x_ptr + row * sx_m + ks, mask=k_ok, other=0.0).to(tl.float32)
        ok = col_ok[:, None] & k_ok[None, :]
        if INT4:
            # BLOCK_K is the group: one scale and one zero per row of this block
            byte = tl.load(w_ptr + cols[:, None] * sw_n + ks[None, :] // 2, mask=ok, other=0).to(tl.int32)
            code = (byte >> ((ks[None, :] % 2) * 4)) & 15
            scale = tl.load(scale_ptr + cols * ss_n + k0 // BLOCK_K, mask=col_ok, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + cols * ss_n + k0 // BLOCK_K, mask=col_ok, other=0.0).to(tl.float32)
            w = (code.to(tl.float32) - 8.0) * scale[:, None] + zero[:, None]
            acc += tl.sum(tl.where(ok, w, 0.0) * x[None, :], axis=1)
        else:
            q = tl.load(w_ptr + cols[:, None] * sw_n + ks[None, :], mask=ok, other=0).to(tl.float32)
            acc += tl.sum(q * x[None, :], axis=1)
    if not INT4:  # a per-row scale factors out of the dot product
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_out + cols, acc, mask=col_ok)


def quant_linear(
    x: torch.Tensor,
    weight: QuantWeight,
    bias: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """x (M, K) with a unit last stride, M <= ``MAX_ROWS``; an ``int8`` or ``int4`` weight with
    contiguous tensors; bias (N,) or None. Returns (M, N) in x's dtype. ``block_n``, ``block_k``
    (int8 only: int4 walks one group per block), ``num_warps``, ``num_stages``: the launch
    (default: ``LAUNCH`` for the format; set for tuning, ``bench_quant.py gemv --device cuda``)."""
    require_triton()
    if weight.kind not in ("int8", "int4"):
        raise ValueError(f"the GEMV kernel takes int8 or int4 weights, not {weight.kind}")
    m, k = x.shape
    n = weight.out_features
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    int4 = weight.kind == "int4"
    default_n, default_k, default_warps, default_stages = LAUNCH[weight.kind]
    block_n, block_k = block_n or default_n, block_k or default_k
    launch = {"num_warps": num_warps or default_warps, "num_stages": num_stages or default_stages}
    _gemv_kernel[(m, cdiv(n, block_n))](
        x,
        weight.data,
        weight.scale,
        weight.zero if int4 else weight.scale,
        bias if bias is not None else weight.scale,
        out,
        n,
        k,
        x.stride(0),
        weight.data.stride(0),
        weight.scale.stride(0),
        INT4=int4,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=weight.group if int4 else block_k,
        **launch,
    )
    return out
