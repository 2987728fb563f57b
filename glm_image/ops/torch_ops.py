"""The reference backend ``sdpa``: every op family in plain torch, the contract the others meet.

Each method's docstring is the op's contract (shapes, masks, dtypes, exact formula). The models
call ops only through a backend object, so a faster backend (``triton``, ``npu``) replaces a
method and must give the same result within its tolerance table; anything it cannot do falls
back here with a stated reason (``Ops.fallback``), logged once.

Masks and rotary tables are read-only for a backend and are not modified in place by the caller
while a forward uses them, so a backend may derive what it needs from them once per forward
(the ``npu`` backend converts mask polarity and the sin sign once, not once per layer).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = ["Ops", "TorchOps"]

log = logging.getLogger("glm_image.ops")


class Ops:
    """A backend: a name, the device it serves, and the op families. Subclasses override ops."""

    name = "?"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._told: set[tuple[str, str]] = set()

    def fallback(self, op: str, reason: str) -> None:
        """Note (once per op and reason) that ``op`` runs on the reference path, and why."""
        if (op, reason) not in self._told:
            self._told.add((op, reason))
            log.info("%s backend: %s falls back to sdpa (%s)", self.name, op, reason)

    @property
    def fallbacks(self) -> list[tuple[str, str]]:
        """(op, reason) for every fallback taken so far."""
        return sorted(self._told)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, device={self.device})"


class TorchOps(Ops):
    """``sdpa``: torch's scaled_dot_product_attention and plain tensor maths. Always registered."""

    name = "sdpa"

    # ------------------------------------------------------------------ attention

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """Prefill / joint attention. q (B, H, T, D); k, v (B, KV, S, D) with H a multiple of KV
        (grouped-query: query head h reads KV head h // (H / KV)).

        ``mask``: None (every query sees every key), a bool tensor broadcastable to (B, H, T, S)
        with True = may attend, or a float tensor of the same shape added to the scores.
        Returns (B, H, T, D) in q's dtype.
        """
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )

    def decode_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor,
        *,
        scale: float,
        length: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One new query per row over a layer's static KV cache.

        q (B, H, 1, D); keys, values (B, KV, C, D): the whole cache (C = capacity); visible
        (B, C) bool, True = may attend (every row sees at least one slot). ``length``, when given,
        is a bound: no slot at or past it is visible, so a backend may skip them. It is a Python
        int, or a 1-element int32 tensor on the device (a CUDA graph's changing bound), or None.
        Returns (B, H, 1, D).
        """
        if isinstance(length, int):  # a tensor bound would need a host read: use the mask alone
            keys, values, visible = keys[:, :, :length], values[:, :, :length], visible[:, :length]
        return self.attention(q, keys, values, mask=visible[:, None, None, :], scale=scale)

    # ------------------------------------------------------------------ normalisation

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim: statistics in float32, the
        normalised value cast back to x's dtype before the weight (the reference's order)."""
        # torch.rms_norm without a weight is exactly h * rsqrt(mean(h^2) + eps), in one call
        return weight * torch.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        *,
        pre_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual step between two blocks: returns (normed, new_residual) with

            h = rms_norm(x, pre_weight) if pre_weight is given else x   (GLM's sandwich norm)
            new_residual = residual + h
            normed = rms_norm(new_residual, weight)

        x, residual (..., dim) of one dtype; weights (dim,).
        """
        h = self.rms_norm(x, pre_weight, eps) if pre_weight is not None else x
        new_residual = residual + h
        return self.rms_norm(new_residual, weight, eps), new_residual

    def layer_norm_modulate(
        self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """AdaLN: ``layer_norm(x) * (1 + scale) + shift``, LayerNorm without affine weights over
        the last dim. x (B, N, dim); scale, shift (B, 1, dim). Returns x's dtype."""
        return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift

    # ------------------------------------------------------------------ rotary embeddings

    def rotary_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        """Partial rotate-half RoPE in place (the AR model's M-RoPE, tables from
        ``models.ar.rotary_tables``). x (B, T, heads, D), any strides with a unit last stride;
        cos, signed_sin (B, T, rot), rot <= D even; channels [rot, D) are left alone.

        ``signed_sin`` carries rotate-half's sign (-sin on the first half), so the result is
        ``x * cos + roll(x, rot / 2) * signed_sin`` on the first rot channels, which equals the
        reference's ``x * cos + rotate_half(x) * sin`` product for product.
        """
        rot = cos.shape[-1]
        cos, signed_sin = cos.unsqueeze(2), signed_sin.unsqueeze(2)
        x_rot = x[..., :rot]
        rolled = torch.roll(x_rot, rot // 2, dims=-1).mul_(signed_sin)
        x_rot.mul_(cos).add_(rolled)

    def qk_norm_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        text_len: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The DiT's query/key preparation. q, k (B, S, heads, D), any strides with a unit last
        stride (views of the fused qkv output). Each is LayerNorm'ed over D (no affine weights;
        statistics in float32, cast back to the input dtype), then the image tokens
        [text_len, S) get 2D rotate-half RoPE computed in float32: ``x * cos + rotate_half(x) *
        sin`` with cos, sin (S - text_len, D) float32 (``models.dit.image_rotary_tables``).
        Text tokens are not rotated. Returns q, k as (B, heads, S, D) (the attention layout).
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

    # ------------------------------------------------------------------ activations

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for x = [gate, up] along the last dim (the AR model's MLP)."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
