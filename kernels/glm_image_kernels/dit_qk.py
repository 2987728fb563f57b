"""The DiT's query/key preparation in one pass: LayerNorm QK-norm + 2D RoPE on image tokens, and
the transpose to the attention layout (``Ops.qk_norm_rope``).

Why a kernel: the reference normalises (a float32 temporary), splits, negates, concatenates,
rotates in float32 and concatenates text and image back, then transposes: about ten passes over
q and k. Here each head row of q and k is read once from the fused qkv output and written once,
already in (B, heads, S, D):

    y = (x - mean) / sqrt(var + eps)                          over D, no affine weights
    image tokens s >= text_len (row p = s - text_len of the tables), h = D / 2:
        out[:h] = y[:h] * cos[p, :h] - y[h:] * sin[p, :h]
        out[h:] = y[h:] * cos[p, h:] + y[:h] * sin[p, h:]
    text tokens: out = y

q, k (B, S, heads, D), unit last stride (views of the qkv GEMM output); cos, sin (S - text_len,
D) float32, unit last stride. Grid (B * S, cdiv(heads, BLOCK_H)): one program per token and block
of heads does q and k together and loads the token's table row once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import cdiv, next_power_of_2, require_triton, tl, triton

__all__ = ["qk_norm_rope", "qk_norm_rope_reference"]

_MAX_BLOCK_H = 32


@triton.jit
def _norm_rotate(x_ptr, o_ptr, mask, c1, c2, s1, s2, HALF: tl.constexpr, eps):
    """One (BLOCK_H, D) tile as two halves: LayerNorm over D, then rotate (identity on text)."""
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    mean = (tl.sum(x1, 1) + tl.sum(x2, 1)) / (2 * HALF)
    x1 = tl.where(mask, x1 - mean[:, None], 0.0)
    x2 = tl.where(mask, x2 - mean[:, None], 0.0)
    inv = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    y1 = x1 * inv
    y2 = x2 * inv
    tl.store(o_ptr, y1 * c1 - y2 * s1, mask=mask)
    tl.store(o_ptr + HALF, y2 * c2 + y1 * s2, mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    qo_ptr,
    ko_ptr,
    seq,
    heads,
    text_len,
    sq_b,
    sq_s,
    sq_h,
    sk_b,
    sk_s,
    sk_h,
    sc,
    ss,
    eps,
    HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // seq
    s = row % seq
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < HALF
    # text tokens take cos = 1, sin = 0 (no rotation); their table loads are masked off
    p = s - text_len
    t_ok = r_ok & ((r * 0 + p) >= 0)  # compared as a vector: 3.9's interpreter rejects a scalar here
    c1 = tl.load(cos_ptr + p * sc + r, mask=t_ok, other=1.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + p * sc + HALF + r, mask=t_ok, other=1.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + p * ss + r, mask=t_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + p * ss + HALF + r, mask=t_ok, other=0.0).to(tl.float32)[None, :]
    mask = (hs < heads)[:, None] & r_ok[None, :]
    out = ((b * heads + hs) * seq + s)[:, None] * (2 * HALF) + r[None, :]
    q_in = q_ptr + b * sq_b + s * sq_s + hs[:, None] * sq_h + r[None, :]
    k_in = k_ptr + b * sk_b + s * sk_s + hs[:, None] * sk_h + r[None, :]
    _norm_rotate(q_in, qo_ptr + out, mask, c1, c2, s1, s2, HALF, eps)
    _norm_rotate(k_in, ko_ptr + out, mask, c1, c2, s1, s2, HALF, eps)


def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, text_len: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, S, heads, D), D even; cos, sin (S - text_len, D). Returns q, k as (B, heads, S,
    D) contiguous, in q's dtype."""
    require_triton()
    b, s, heads, d = q.shape
    if d % 2 or k.shape != q.shape or cos.shape != (s - text_len, d) or sin.shape != cos.shape:
        raise ValueError(
            f"qk_norm_rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin "
            f"{tuple(sin.shape)} and text_len {text_len} do not fit (B, S, heads, D) / (S - text_len, D)"
        )
    q_out = torch.empty((b, heads, s, d), device=q.device, dtype=q.dtype)
    k_out = torch.empty((b, heads, s, d), device=q.device, dtype=q.dtype)
    if q_out.numel() == 0:
        return q_out, k_out
    half = d // 2
    block_h = min(next_power_of_2(heads), _MAX_BLOCK_H)
    _qk_norm_rope_kernel[(b * s, cdiv(heads, block_h))](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        s,
        heads,
        text_len,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        cos.stride(0),
        sin.stride(0),
        eps,
        HALF=half,
        BLOCK_R=next_power_of_2(half),
        BLOCK_H=block_h,
        num_warps=4,
    )
    return q_out, k_out


def qk_norm_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, text_len: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin, and the reference ``qk_norm_rope`` op: the DiT's query/key preparation.

    q, k (B, S, heads, D), any strides with a unit last stride (views of the fused qkv output).
    Each is LayerNorm'ed over D (no affine weights; statistics in float32, cast back to the input
    dtype), then the image tokens [text_len, S) get 2D rotate-half RoPE computed in float32:
    ``x * cos + rotate_half(x) * sin`` with cos, sin (S - text_len, D) float32
    (``glm_image.models.dit.image_rotary_tables``). Text tokens are not rotated. Returns q, k as
    (B, heads, S, D) (the attention layout).
    """
    out = []
    for x in (q, k):
        x = F.layer_norm(x, (x.shape[-1],), eps=eps).to(x.dtype)
        image = x[:, text_len:]
        x1, x2 = image.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        c, s = cos[None, :, None], sin[None, :, None]
        image = (image.float() * c + rotated.float() * s).to(x.dtype)
        out.append(torch.cat([x[:, :text_len], image], dim=1).transpose(1, 2))
    return out[0], out[1]
