"""LayerNorm (no affine weights) + AdaLN modulation for the DiT (``Ops.layer_norm_modulate``).

Why a kernel: the reference normalises, adds one to the scale, multiplies and adds the shift in
four passes with a full-size temporary each; this reads the row once and writes it once:

    out = (x - mean) / sqrt(var + eps) * (1 + scale[b]) + shift[b]     (float32, rounded once)

x (B, N, dim) with a unit last stride; scale, shift (B, 1, dim) (or (1, 1, dim), broadcast), unit
last stride: they are chunks of the DiT's modulation GEMM output, so their batch stride is not
dim. Grid (B * N,): one program per row, the whole row in one block (dim <= ``residual_norm.MAX_DIM``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import next_power_of_2, require_triton, tl, triton

__all__ = ["layer_norm_modulate", "layer_norm_modulate_reference"]


@triton.jit
def _layer_norm_modulate_kernel(
    x_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    tokens,
    dim,
    sx_b,
    sx_n,
    ssc_b,
    ssh_b,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // tokens
    n = row % tokens
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(x_ptr + b * sx_b + n * sx_n + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / dim
    xc = tl.where(ok, x - mean, 0.0)
    y = xc * tl.rsqrt(tl.sum(xc * xc, 0) / dim + eps)
    scale = tl.load(scale_ptr + b * ssc_b + cols, mask=ok, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * ssh_b + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, y * (1.0 + scale) + shift, mask=ok)


def layer_norm_modulate(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> torch.Tensor:
    """x (B, N, dim); scale, shift (B or 1, 1, dim); one dtype. Returns (B, N, dim), contiguous."""
    require_triton()
    b, n, dim = x.shape
    scale, shift = scale.expand(b, 1, dim), shift.expand(b, 1, dim)
    out = torch.empty((b, n, dim), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block = next_power_of_2(dim)
    _layer_norm_modulate_kernel[(b * n,)](
        x,
        scale,
        shift,
        out,
        n,
        dim,
        x.stride(0),
        x.stride(1),
        scale.stride(0),
        shift.stride(0),
        eps,
        BLOCK=block,
        num_warps=max(1, min(16, block // 512)),
    )
    return out


def layer_norm_modulate_reference(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> torch.Tensor:
    """The twin, and the reference ``layer_norm_modulate`` op (AdaLN): ``layer_norm(x) * (1 +
    scale) + shift``, LayerNorm without affine weights over the last dim. x (B, N, dim); scale,
    shift (B, 1, dim). Returns x's dtype."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift
