"""Condition images -> VQ codes: the GLM-Image ViT and its vector quantizer (image-to-image).

The ViT embeds 16x16 patches (a convolution), adds a learned 2D position table resampled to the
image's patch grid (bilinear ``grid_sample`` at the patch centres, border padding), runs
pre-LayerNorm blocks with full attention within each image and a GELU MLP, and has no final norm.
The quantizer projects each patch feature (1x1 convolution) and takes the nearest code by L2
distance between L2-normalised vectors: one code per patch, raster order, as the AR prompt and
the DiT prior tokens want them.

Parameter names are the checkpoint's, under ``model.visual`` and ``model.vqmodel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig, VqConfig

__all__ = ["VisionEncoder"]


class _Embeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.position_embedding = nn.Embedding(
            (config.image_size // config.patch_size) ** 2, config.hidden_size
        )

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """x (N, hidden) patch embeddings of all images; adds each image's resampled positions."""
        table = self.position_embedding.weight
        side = int(table.shape[0] ** 0.5)
        table_2d = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()  # (1, hidden, side, side)
        coords = []
        for t, h, w in grids:
            rows = torch.arange(h, device=x.device).repeat_interleave(w).repeat(t).float()
            cols = torch.arange(w, device=x.device).repeat(h * t).float()
            # patch centres in [-1, 1]
            coords.append(torch.stack([(cols + 0.5) / w * 2 - 1, (rows + 0.5) / h * 2 - 1], dim=-1))
        grid = torch.cat(coords)[None, :, None, :]  # (1, N, 1, 2) as (x, y)
        pos = F.grid_sample(table_2d, grid, mode="bilinear", align_corners=False, padding_mode="border")
        return x + pos.squeeze(0).squeeze(-1).permute(1, 0).to(table.dtype)


class _Attention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, -1).permute(1, 2, 0, 3).unbind(0)  # (heads, N, D)
        outs = [
            F.scaled_dot_product_attention(qi[None], ki[None], vi[None])[0]  # each image sees itself only
            for qi, ki, vi in zip(*(t.split(lengths, dim=1) for t in (q, k, v)), strict=True)
        ]
        return self.proj(torch.cat(outs, dim=1).transpose(0, 1).reshape(n, -1))


class _Mlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = _Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = _Mlp(config)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), lengths)
        return x + self.mlp(self.norm2(x))


class _Vit(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.patch_embed = nn.Module()
        p = config.patch_size
        self.patch_embed.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))


class _Quantizer(nn.Module):
    def __init__(self, config: VqConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.num_embeddings, config.embed_dim)


class _Vq(nn.Module):
    def __init__(self, config: VqConfig) -> None:
        super().__init__()
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.quantize = _Quantizer(config)


class VisionEncoder(nn.Module):
    """Packed patches of one or more images -> patch features -> one VQ code per patch."""

    # The text decoder shares this folder; post_quant_conv decodes codes back, which we never do.
    UNUSED_CHECKPOINT_PREFIXES = ("model.language_model.", "lm_head.", "model.vqmodel.post_quant_conv.")

    def __init__(self, vision: VisionConfig, vq: VqConfig) -> None:
        super().__init__()
        self.visual = _Vit(vision)
        self.vqmodel = _Vq(vq)

    def checkpoint_key_map(self) -> dict[str, str]:
        return {name: f"model.{name}" for name in self.state_dict()}

    def features(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """pixel_values (N, C*p*p) as the processor packs them -> per image (hidden, h, w)."""
        vit = self.visual
        p, c = vit.config.patch_size, vit.config.in_channels
        weight = vit.patch_embed.proj.weight
        x = vit.patch_embed.proj(pixel_values.view(-1, c, p, p).to(weight.dtype)).view(-1, weight.shape[0])
        x = vit.embeddings(x, grids)
        lengths = [t * h * w for t, h, w in grids]
        for block in vit.blocks:
            x = block(x, lengths)
        return [
            f.view(t, h, w, -1).permute(0, 3, 1, 2).reshape(-1, h, w)
            for f, (t, h, w) in zip(x.split(lengths), grids, strict=True)
        ]

    def tokens(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image (hidden, h, w) -> (h*w,) codes, raster order."""
        codebook = F.normalize(self.vqmodel.quantize.embedding.weight, p=2, dim=-1)
        codes = []
        for f in features:
            z = self.vqmodel.quant_conv(f[None]).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
            z = F.normalize(z, p=2, dim=-1)
            distances = (
                torch.sum(z**2, dim=1, keepdim=True)
                + torch.sum(codebook**2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", z, codebook.transpose(0, 1))
            )
            codes.append(torch.argmin(distances, dim=1))
        return codes
