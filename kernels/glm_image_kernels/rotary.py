"""Partial rotate-half RoPE applied in place: the AR model's M-RoPE (``Ops.rotary_``).

Why a kernel: the reference rolls, multiplies and adds the rotated channels in four passes with
a temporary; this reads the first ``rot`` channels of every q and k head once and writes them
back once, computing in float32 and rounding once.

x (B, T, heads, D) is a strided view (the q and k heads of the fused qkv output, unit last
stride); cos, signed_sin (B, T, rot) carry rotate-half's sign (-sin on the first half), so with
h = rot / 2, for j < h:

    x[j]     <- x[j] * cos[j]         + x[j + h] * signed_sin[j]
    x[j + h] <- x[j + h] * cos[j + h] + x[j] * signed_sin[j + h]

Channels [rot, D) are untouched. Grid (B * T, cdiv(heads, BLOCK_H)): one program per token and
block of heads; the token's table row is loaded once for all its heads.
"""

from __future__ import annotations

import torch

from ._triton import cdiv, next_power_of_2, require_triton, tl, triton

__all__ = ["rotary_", "rotary_reference_"]

_MAX_BLOCK_H = 64


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    tokens,
    heads,
    sx_b,
    sx_t,
    sx_h,
    sc_b,
    sc_t,
    ss_b,
    ss_t,
    HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // tokens
    t = row % tokens
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < HALF
    cos = cos_ptr + b * sc_b + t * sc_t
    sin = sin_ptr + b * ss_b + t * ss_t
    c1 = tl.load(cos + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos + HALF + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin + HALF + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = x_ptr + b * sx_b + t * sx_t + hs[:, None] * sx_h + r[None, :]
    mask = (hs < heads)[:, None] & r_ok[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, x1 * c1 + x2 * s1, mask=mask)
    tl.store(ptrs + HALF, x2 * c2 + x1 * s2, mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """In place. x (B, T, heads, D) with a unit last stride; cos, signed_sin broadcastable to
    (B, T, rot) with a unit last stride, rot even and <= D."""
    require_triton()
    b, t, heads, d = x.shape
    rot = cos.shape[-1]
    if rot % 2 or rot > d or signed_sin.shape[-1] != rot:
        raise ValueError(f"rotary_: tables of {rot} channels do not fit heads of {d}")
    if x.numel() == 0:
        return
    cos, signed_sin = cos.expand(b, t, rot), signed_sin.expand(b, t, rot)
    half = rot // 2
    block_h = min(next_power_of_2(heads), _MAX_BLOCK_H)
    _rotary_kernel[(b * t, cdiv(heads, block_h))](
        x,
        cos,
        signed_sin,
        t,
        heads,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        cos.stride(0),
        cos.stride(1),
        signed_sin.stride(0),
        signed_sin.stride(1),
        HALF=half,
        BLOCK_R=next_power_of_2(half),
        BLOCK_H=block_h,
        num_warps=4,
    )


def rotary_reference_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """The twin, and the reference ``rotary_`` op: partial rotate-half RoPE in place, in x's
    dtype (the AR model's M-RoPE, tables from ``glm_image.models.ar.rotary_tables``).

    x (B, T, heads, D), any strides with a unit last stride; cos, signed_sin (B, T, rot), rot <=
    D even; channels [rot, D) are left alone. ``signed_sin`` carries rotate-half's sign (-sin on
    the first half), so the result is ``x * cos + roll(x, rot / 2) * signed_sin`` on the first
    rot channels, which equals the reference model's ``x * cos + rotate_half(x) * sin`` product
    for product.
    """
    rot = cos.shape[-1]
    cos, signed_sin = cos.unsqueeze(2), signed_sin.unsqueeze(2)
    x_rot = x[..., :rot]
    rolled = torch.roll(x_rot, rot // 2, dims=-1).mul_(signed_sin)
    x_rot.mul_(cos).add_(rolled)
