"""RMSNorm, and the AR model's residual step fused into one pass (``Ops.rms_norm``,
``Ops.add_rms_norm``).

Why a kernel: between two blocks the reference runs a sandwich norm, a residual add and the next
pre-norm as separate passes (each reading and writing the hidden state, plus float32
temporaries). Here one program per row reads x and the residual once, keeps everything in
float32 registers, and writes the normed value and the new residual once:

    h            = rms_norm(x, pre_weight)   if pre_weight is given, else x
    new_residual = residual + h              stored in the residual's dtype
    normed       = rms_norm(new_residual, weight)

``normed`` is computed from ``new_residual`` as stored (rounded), so the residual stream the next
block reads and the value it normalised agree exactly. rms_norm(x, w) = w * x / sqrt(mean(x^2) +
eps) over the last dim.

Shapes: x, residual (..., dim) with a unit last stride (rows are flattened); weights (dim,).
Grid (rows,): one program per row, the whole row in one block (dim <= ``MAX_DIM``).
"""

from __future__ import annotations

import torch

from ._triton import next_power_of_2, require_triton, tl, triton

__all__ = ["MAX_DIM", "add_rms_norm", "add_rms_norm_reference", "rms_norm", "rms_norm_reference"]

MAX_DIM = 16384  # one row per program, held in registers


def _warps(block: int) -> int:
    return max(1, min(16, block // 512))


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, sx, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / dim + eps)
    tl.store(out_ptr + row * dim + cols, x * inv * w, mask=ok)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    pre_w_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    sx,
    sr,
    dim,
    eps,
    HAS_PRE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    h = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_PRE:
        pre_w = tl.load(pre_w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, 0) / dim + eps) * pre_w
    h += tl.load(res_ptr + row * sr + cols, mask=ok, other=0.0).to(tl.float32)
    h = h.to(new_res_ptr.dtype.element_ty)
    tl.store(new_res_ptr + row * dim + cols, h, mask=ok)
    h = h.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, h * tl.rsqrt(tl.sum(h * h, 0) / dim + eps) * w, mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., dim) -> (rows, dim) with a row stride; a view whenever the leading dims allow one."""
    return x.reshape(-1, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim), weight (dim,), one dtype; returns x's shape, contiguous."""
    require_triton()
    dim = x.shape[-1]
    rows = _rows(x)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block = next_power_of_2(dim)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, rows.stride(0), dim, eps, BLOCK=block, num_warps=_warps(block)
    )
    return out


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    pre_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual), both x's shape and dtype, contiguous. See the module docstring."""
    require_triton()
    dim = x.shape[-1]
    xs, rs = _rows(x), _rows(residual)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    new_residual = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out, new_residual
    block = next_power_of_2(dim)
    _add_rms_norm_kernel[(xs.shape[0],)](
        xs,
        rs,
        weight if pre_weight is None else pre_weight,
        weight,
        out,
        new_residual,
        xs.stride(0),
        rs.stride(0),
        dim,
        eps,
        HAS_PRE=pre_weight is not None,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return out, new_residual


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The twin, and the reference ``rms_norm`` op: ``weight * (x / sqrt(mean(x^2) + eps))`` over
    the last dim, statistics in float32, the normalised value cast back to x's dtype before the
    weight (the reference model's order)."""
    # torch.rms_norm without a weight is exactly h * rsqrt(mean(h^2) + eps), in one call
    return weight * torch.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    pre_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin, and the reference ``add_rms_norm`` op: the residual step between two blocks,
    (normed, new_residual) as in the module docstring (GLM's sandwich norm when ``pre_weight``
    is given). x, residual (..., dim) of one dtype; weights (dim,)."""
    h = rms_norm_reference(x, pre_weight, eps) if pre_weight is not None else x
    new_residual = residual + h
    return rms_norm_reference(new_residual, weight, eps), new_residual
