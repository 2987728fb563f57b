"""Weight-only quantized linear layers: the weight formats, their reference twin, and a Triton
decode GEMM for 1..``MAX_ROWS`` activation rows.

A quantized weight (``QuantWeight``) is one of

- ``int8``: ``data`` int8 (N, K), ``scale`` float32 (N,): ``w = data * scale[:, None]``;
- ``int4``: ``data`` uint8 (N, K / 2), two 4-bit codes per byte (the low nibble holds the even
  input channel), ``scale`` and ``zero`` bfloat16 (N, K / group): ``w = (code - 8) * scale +
  zero`` over each group of ``group`` input channels of a row (``zero`` is the value of code 8);
- ``fp8``: ``data`` float8_e4m3fn (N, K), ``scale`` float32 (N,): ``w = float(data) * scale``.

``quant_linear_reference`` is the maths every implementation is held to (the twin, and the
reference ``Ops.quant_linear`` path): dequantize to the activations' dtype, then ``F.linear``.

Why a kernel: a decode step (a batch of sequences, each with a Jacobi window of a few tokens)
multiplies a few activation rows by every weight, so it is bound by the bytes of weight read, and
the reference materialises the full-precision weight first (more bytes than the unquantized
model). ``quant_linear`` reads the int8 or int4 codes, dequantizes them in registers and
multiplies them on the tensor cores with float32 accumulation:

    out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])        rounded once, to x's dtype

Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)), the row blocks fastest: program (r, j) loads each
(BLOCK_N, BLOCK_K) weight tile of its output channels once per K step, dequantizes it, and
multiplies it against the (BLOCK_M, BLOCK_K) activation tile with ``tl.dot`` (rows past M load
as zeros and are not stored). Up to BLOCK_M rows the weight is read once; beyond, each row block
reads it again, and the row blocks of one weight tile run side by side, so the repeats mostly
hit L2 (the grouped ordering of the Triton matmul tutorial). BLOCK_M is one fixed tile, not
chosen by M: see row invariance below. int8: the codes are exact in every activation dtype, the
per-channel scale is applied once after the K loop. int4 (the Marlin / vLLM pattern, in Triton):
each packed byte is loaded once, as a (BLOCK_N, BLOCK_K / group, group / 2) tile of several
groups, its low and high nibbles give the even and odd channels, each group's scale and zero come
as a (BLOCK_N, BLOCK_K / group) tile, and the two halves are interleaved (``tl.join``) into the
(BLOCK_N, BLOCK_K) weight tile, rounded to the activations' dtype as the reference rounds it.

There is no split over K: each output is one program's sum over K in a fixed order, so no
partial sums are combined across programs (no atomics, no second pass). The price is fewer
programs for narrow layers at one row (N / BLOCK_N), which the launch weighs against re-reading
the activations (every block of output channels reads all of them: with 16-bit activations,
2 * M / (BLOCK_N * bytes per weight element) times the weight's bytes, through L2).

Row invariance (a rule of this codebase: a row's result must not depend on the rows computed
with it): the launch (``LAUNCH``, or the caller's overrides) is the same for every M, and the row
count is not specialised on (``do_not_specialize``), so every row is computed by the same compiled
kernel, tile and K order. ``tl.dot`` computes each output element from its own row of x and
column of w; for a fixed tile configuration its per-element reduction does not depend on the
other rows of the tile (zero padding included), on the tensor cores as in the interpreter. Hence
row i's output is bit-identical whatever M is and whatever other rows share the call (Jacobi
windows and batching rely on it; ``tests/test_quant_kernels.py`` checks it in the interpreter).
Changing the launch changes the rounding of every row alike, so pick it once per process.

Products: with 16-bit activations on CUDA (``NATIVE_DOT``) the tensor cores take x and the
dequantized tile in x's dtype (exact products, float32 accumulation); float32 activations use
``tf32x3`` (three TF32 products, ~float32 accuracy); Triton's interpreter cannot multiply 16-bit
operands, so there every operand is float32 (the tile still rounded to x's dtype first).

``MAX_ROWS`` (128) is where the ``triton`` backend stops using this kernel: past it a GEMM is
compute-bound and the backend dequantizes into a tensor-core GEMM instead. The kernel itself
takes any M.

``LAUNCH``: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per format, a first guess made without a
GPU (BLOCK_N 32: 128 programs for the AR's narrowest layers at one row, about one per SM of an
H100 / H200; BLOCK_K 256: 8 KiB int8 or 4 KiB int4 tiles, 4 pipeline stages; BLOCK_M 16, the
smallest tensor-core tile). ``benchmarks/bench_quant.py gemv --device cuda`` times a set of
launches at M = 1..128 on the AR's linears and reports each one's share of the card's HBM
bandwidth; set ``LAUNCH`` (or pass ``block_*`` / ``num_*``) from it. History: the kernel this one
replaced (one program per row, ``tl.sum``, at most 16 rows) took 123.5 us for one row through a
layer's four int8 linears on an H200 (1.65 TB/s of weights), dense bf16 148.1 us.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import cdiv, interpreted, require_triton, tl, triton

__all__ = [
    "LAUNCH",
    "MAX_ROWS",
    "QuantWeight",
    "launch_for",
    "quant_linear",
    "quant_linear_reference",
    "unpack_int4",
]

MAX_ROWS = 128  # activation rows the triton backend sends to the kernel; a dequantized GEMM beyond
DEQUANTIZE_ELEMENTS = 1 << 22  # weight elements dequantized at a time (16 MiB of float32)
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per format: one launch for every M (module docstring)
LAUNCH = {"int8": (16, 32, 256, 4, 4), "int4": (16, 32, 256, 4, 4)}


@dataclass(frozen=True)
class QuantWeight:
    """A quantized (out_features, in_features) weight; see the module docstring for the formats."""

    kind: str
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group: int = 0
    # int8: a GEMM path may quantize the activations per token too (W8A8: the DiT's linears);
    # False keeps weight-only numerics (the AR's: LLM activations have outlier channels)
    w8a8: bool = False

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
def _int4_tile(
    w_ptr,
    scale_ptr,
    zero_ptr,
    cols,
    col_ok,
    k0,
    k_in,
    sw_n,
    ss_n,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The (BLOCK_N, BLOCK_K) float32 weight tile of input channels [k0, k0 + BLOCK_K): each
    byte loaded once, both nibbles used; groups past K (a partial last step) are zeros."""
    groups = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)  # the step's groups
    group_ok = groups < k_in // GROUP
    half = tl.arange(0, GROUP // 2)  # bytes of a group
    ok = col_ok[:, None, None] & group_ok[None, :, None]
    byte = tl.load(
        w_ptr + cols[:, None, None] * sw_n + (groups[:, None] * (GROUP // 2) + half[None, :])[None, :, :],
        mask=ok,
        other=0,
    )  # (BLOCK_N, groups, GROUP / 2) uint8
    at = cols[:, None] * ss_n + groups[None, :]
    ok2 = col_ok[:, None] & group_ok[None, :]
    scale = tl.load(scale_ptr + at, mask=ok2, other=0.0).to(tl.float32)[:, :, None]
    zero = tl.load(zero_ptr + at, mask=ok2, other=0.0).to(tl.float32)[:, :, None]
    even = ((byte & 15).to(tl.float32) - 8.0) * scale + zero  # masked: (0 - 8) * 0 + 0 = 0
    odd = ((byte >> 4).to(tl.float32) - 8.0) * scale + zero
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))  # channel 2j + t


@triton.jit(do_not_specialize=["m_rows"])
def _gemm_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    zero_ptr,
    bias_ptr,
    out_ptr,
    m_rows,
    n_out,
    k_in,
    sx_m,
    sw_n,
    ss_n,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m_rows
    col_ok = cols < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_in
        x = tl.load(
            x_ptr + rows[:, None] * sx_m + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        if INT4:  # rounded to x's dtype as the reference rounds its weight
            w = _int4_tile(
                w_ptr, scale_ptr, zero_ptr, cols, col_ok, k0, k_in, sw_n, ss_n, GROUP, BLOCK_N, BLOCK_K
            )
            w = w.to(x.dtype)
        else:  # int8 codes: exact in every float dtype (converted at the dot: the interpreter's
            # int8 -> bfloat16 gives NaN, so there they go straight to float32)
            w = tl.load(
                w_ptr + cols[:, None] * sw_n + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0
            )
        if NATIVE_DOT:  # 16-bit operands, float32 accumulation: exact products
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        else:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="tf32x3")
    if not INT4:  # a per-channel scale factors out of the sum over K
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * n_out + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def launch_for(
    weight: QuantWeight,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> dict:
    """The launch ``quant_linear`` uses for ``weight``: ``LAUNCH`` for its format, each field
    replaced where given; int4's BLOCK_K is raised to the group where it is smaller. Never
    depends on the row count (row invariance, module docstring)."""
    bm, bn, bk, warps, stages = LAUNCH[weight.kind]
    launch = {
        "block_m": block_m or bm,
        "block_n": block_n or bn,
        "block_k": block_k or bk,
        "num_warps": num_warps or warps,
        "num_stages": num_stages or stages,
    }
    if weight.kind == "int4":
        launch["block_k"] = max(launch["block_k"], weight.group)
    for name in ("block_m", "block_n", "block_k"):
        if not (_power_of_two(launch[name]) and launch[name] >= 16):
            raise ValueError(f"quant_linear: {name} = {launch[name]} must be a power of two >= 16")
    return launch


def quant_linear(
    x: torch.Tensor,
    weight: QuantWeight,
    bias: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """x (M, K) with a unit last stride (any M; the ``triton`` backend sends up to ``MAX_ROWS``);
    an ``int8`` or ``int4`` weight (int4 group a power of two) with contiguous tensors; bias (N,)
    or None. Returns (M, N) in x's dtype. ``block_m``, ``block_n``, ``block_k`` (powers of two
    >= 16; int4: at least the group), ``num_warps``, ``num_stages``: the launch (default:
    ``LAUNCH`` for the format, ``launch_for``). Keep one launch for all calls whose rows must
    agree: a row's bits depend on the launch, never on the other rows."""
    require_triton()
    if weight.kind not in ("int8", "int4"):
        raise ValueError(f"quant_linear: the kernel takes int8 or int4 weights, not {weight.kind}")
    int4 = weight.kind == "int4"
    if int4 and not (_power_of_two(weight.group) and weight.group >= 2):
        raise ValueError(f"quant_linear: int4 group = {weight.group} must be a power of two")
    if x.dim() != 2 or x.shape[1] != weight.in_features or (x.shape[0] and x.stride(1) != 1):
        raise ValueError(
            f"quant_linear: x {tuple(x.shape)} must be (M, {weight.in_features}) with a unit last stride"
        )
    if bias is not None and (bias.shape != (weight.out_features,) or bias.stride(0) != 1):
        raise ValueError(
            f"quant_linear: bias {tuple(bias.shape)} must be ({weight.out_features},), contiguous"
        )
    launch = launch_for(
        weight, block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages
    )
    m, k = x.shape
    n = weight.out_features
    if max(weight.data.numel(), m * max(x.stride(0), k), m * n) >= 2**31:
        raise ValueError(f"quant_linear: x {tuple(x.shape)} by ({n}, {k}) passes the kernel's 32-bit offsets")
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    native_dot = x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda and not interpreted()
    grid = (cdiv(m, launch["block_m"]), cdiv(n, launch["block_n"]))
    _gemm_kernel[grid](
        x,
        weight.data,
        weight.scale,
        weight.zero if int4 else weight.scale,
        bias if bias is not None else weight.scale,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.data.stride(0),
        weight.scale.stride(0),
        INT4=int4,
        GROUP=weight.group if int4 else 1,
        HAS_BIAS=bias is not None,
        NATIVE_DOT=native_dot,
        BLOCK_M=launch["block_m"],
        BLOCK_N=launch["block_n"],
        BLOCK_K=launch["block_k"],
        num_warps=launch["num_warps"],
        num_stages=launch["num_stages"],
    )
    return out
