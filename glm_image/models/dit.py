"""The GLM-Image DiT decoder: prior tokens + glyph embeddings + noisy latents -> velocity.

Single-stream blocks over the joint sequence [text; image]. Per block:

    image, text = AdaLN-zero(image, text, temb)          12 modulation vectors (both streams)
    attention over [text; image], LayerNorm QK-norm, 2D RoPE on the image tokens only
    x += gate * attn;  x += gate * FFN(modulated LayerNorm(x))   (GELU-tanh FFN, shared weights)

Inputs: latents are patchified (2x2) and projected; the prior tokens (one VQ code per patch)
are embedded, projected and added (zeroed where ``prior_drop``, the unconditional branch); the
glyph embeddings (ByT5) are projected to the text stream; timestep, target size and crop
coordinates make the conditioning vector. Output: final AdaLN, projection, unpatchify.

Condition images (image-to-image) are run once at t = 0 with the cache in ``WRITE`` mode; each
layer keeps their keys and values. Conditional steps ``READ`` them (prepended to the keys),
unconditional steps ``SKIP`` them. In a batched CFG forward, ``read_rows`` says which rows read.

Module names follow the checkpoint's ``transformer/`` tensors; only q/k/v are fused (one GEMM).
AdaLN modulation, QK-norm + RoPE and attention run through the ops backend (``self.ops``).
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DitConfig
from ..ops import Ops, TorchOps
from ..weights import Fuse

__all__ = ["CacheMode", "ConditionKVCache", "DitModel", "image_rotary_tables", "timestep_embedding"]

_EPS = 1e-5


class CacheMode(enum.Enum):
    WRITE = "write"  # store this forward's K/V (a condition image at t = 0)
    READ = "read"  # attend to the stored K/V as well (conditional branch)
    SKIP = "skip"  # ignore the store (unconditional branch)


class ConditionKVCache:
    """Per-layer keys/values of the condition images, one entry per sample (B=1 writes)."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.sample = 0

    def next_sample(self) -> None:
        """The following writes belong to the next sample of the batch."""
        self.sample += 1

    @property
    def num_samples(self) -> int:
        return len(self.keys[0])

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (1, heads, S, D); several images of one sample are concatenated along S."""
        keys, values = self.keys[layer], self.values[layer]
        if len(keys) <= self.sample:
            keys.append(k)
            values.append(v)
        else:
            keys[self.sample] = torch.cat([keys[self.sample], k], dim=2)
            values[self.sample] = torch.cat([values[self.sample], v], dim=2)

    def get(self, layer: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored K/V for ``rows`` reading rows: one sample shared, one per row, or each repeated."""
        n = self.num_samples
        if n == 0 or rows % n:
            raise ValueError(f"condition cache holds {n} samples; cannot serve {rows} rows (need a multiple)")
        repeat = rows // n
        keys = torch.cat([k.expand(repeat, -1, -1, -1) for k in self.keys[layer]])
        values = torch.cat([v.expand(repeat, -1, -1, -1) for v in self.values[layer]])
        return keys, values


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (cos first), as diffusers' Timesteps(flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def image_rotary_tables(
    rows: int, cols: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE over the patch grid: half the frequencies from the row, half from the column.

    Returns cos, sin of shape (rows * cols, head_dim), float32, rotate-half layout.
    """
    quarter = head_dim // 4
    inv_freq = 1.0 / (
        10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32)[:quarter] / (head_dim // 2))
    )
    freqs_h = torch.outer(torch.arange(rows, dtype=torch.float32), inv_freq)[:, None].expand(
        rows, cols, quarter
    )
    freqs_w = torch.outer(torch.arange(cols, dtype=torch.float32), inv_freq)[None].expand(rows, cols, quarter)
    freqs = torch.cat([freqs_h, freqs_w], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1).reshape(rows * cols, head_dim).to(device)
    return freqs.cos(), freqs.sin()


class FeedForward(nn.Module):
    """Linear -> activation -> Linear, with diffusers' parameter names (net.0.proj, net.2)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, activation) -> None:
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(hidden, dim_out)])
        self.net[0].proj = nn.Linear(dim_in, hidden)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.activation(self.net[0].proj(x)))


class _TwoLayer(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _Conditioning(nn.Module):
    def __init__(self, config: DitConfig) -> None:
        super().__init__()
        self.time_dim, self.condition_dim = config.time_embed_dim, config.condition_dim
        self.timestep_embedder = _TwoLayer(config.time_embed_dim, config.time_embed_dim)
        self.condition_embedder = _TwoLayer(4 * config.condition_dim, config.time_embed_dim)

    def forward(
        self, t: torch.Tensor, target_size: torch.Tensor, crop: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        b = t.shape[0]
        crop_emb = timestep_embedding(crop.flatten(), self.condition_dim).view(b, -1)
        size_emb = timestep_embedding(target_size.flatten(), self.condition_dim).view(b, -1)
        time = self.timestep_embedder(timestep_embedding(t, self.time_dim).to(dtype))
        cond = self.condition_embedder(torch.cat([crop_emb, size_emb], dim=1).to(dtype))
        return F.silu(time + cond)  # (B, time_embed_dim)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


class _AdaNorm(nn.Module):
    def __init__(self, time_dim: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(time_dim, 12 * dim)


class Block(nn.Module):
    def __init__(self, config: DitConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = _AdaNorm(config.time_embed_dim, dim)
        self.attn1 = _Attention(dim, config.num_attention_heads)
        self.ff = FeedForward(dim, 4 * dim, dim, lambda x: F.gelu(x, approximate="tanh"))

    def forward(
        self,
        ops: Ops,
        image: torch.Tensor,  # (B, N, dim)
        text: torch.Tensor,  # (B, T, dim)
        temb: torch.Tensor,  # (B, time_dim)
        rope: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor | None,  # additive attention bias (B, 1, T + N, keys) or None
        cache: ConditionKVCache | None,
        mode: CacheMode | None,
        layer: int,
        read_rows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dim, t_len = image.shape[-1], text.shape[1]
        (
            shift,
            c_shift,
            scale,
            c_scale,
            gate,
            c_gate,
            shift_mlp,
            c_shift_mlp,
            scale_mlp,
            c_scale_mlp,
            gate_mlp,
            c_gate_mlp,
        ) = (m.unsqueeze(1) for m in self.norm1.linear(temb).chunk(12, dim=1))
        x_img = ops.layer_norm_modulate(image, scale, shift, _EPS)
        x_txt = ops.layer_norm_modulate(text, c_scale, c_shift, _EPS)

        # attention over [text; image]
        x = torch.cat([x_txt, x_img], dim=1)
        b, s, _ = x.shape
        heads = self.attn1.heads
        head_dim = dim // heads
        q, k, v = self.attn1.qkv(x).view(b, s, 3, heads, head_dim).unbind(2)  # (B, S, heads, D)
        q, k = ops.qk_norm_rope(q, k, *rope, t_len, _EPS)  # (B, heads, S, D)
        v = v.transpose(1, 2)
        if cache is not None and mode is CacheMode.WRITE:
            cache.store(layer, k, v)
        elif cache is not None and mode is CacheMode.READ:
            k, v = _with_cache(cache, layer, k, v, read_rows)
        out = ops.attention(q, k, v, mask=bias, scale=head_dim**-0.5)
        out = self.attn1.to_out[0](out.transpose(1, 2).flatten(2))
        out_txt, out_img = out.split([t_len, s - t_len], dim=1)

        image = image + out_img * gate
        text = text + out_txt * c_gate
        ff_img = self.ff(ops.layer_norm_modulate(image, scale_mlp, shift_mlp, _EPS))
        ff_txt = self.ff(ops.layer_norm_modulate(text, c_scale_mlp, c_shift_mlp, _EPS))
        return image + ff_img * gate_mlp, text + ff_txt * c_gate_mlp


def _with_cache(
    cache: ConditionKVCache, layer: int, k: torch.Tensor, v: torch.Tensor, read_rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the stored K/V; rows that do not read get zeros there (masked by the bias)."""
    b = k.shape[0]
    if read_rows is None:
        ck, cv = cache.get(layer, b)
    else:
        rows = read_rows.nonzero().flatten()
        stored_k, stored_v = cache.get(layer, rows.numel())
        ck = stored_k.new_zeros((b, *stored_k.shape[1:])).index_copy_(0, rows, stored_k)
        cv = stored_v.new_zeros((b, *stored_v.shape[1:])).index_copy_(0, rows, stored_v)
    return torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)


class DitModel(nn.Module):
    def __init__(self, config: DitConfig, ops: Ops | None = None) -> None:
        super().__init__()
        self.config = config
        self.ops: Ops = ops or TorchOps()
        dim, p = config.hidden_size, config.patch_size
        self.image_projector = nn.Module()
        self.image_projector.proj = nn.Linear(config.in_channels * p * p, dim)
        self.glyph_projector = FeedForward(config.text_embed_dim, dim, dim, F.gelu)
        self.prior_token_embedding = nn.Embedding(config.prior_vq_quantizer_codebook_size, dim)
        self.prior_projector = FeedForward(dim, dim, dim, F.silu)
        self.time_condition_embed = _Conditioning(config)
        self.transformer_blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(config.time_embed_dim, 2 * dim)
        self.proj_out = nn.Linear(dim, p * p * config.out_channels)

    def checkpoint_key_map(self) -> dict[str, str | Fuse]:
        """Our names -> the checkpoint's (``transformer/``); q/k/v fused, the rest identical."""
        key_map: dict[str, str | Fuse] = {}
        for name in self.state_dict():
            if ".attn1.qkv." in name:
                prefix, kind = name.split(".qkv.")
                key_map[name] = Fuse(tuple(f"{prefix}.to_{p}.{kind}" for p in "qkv"))
            else:
                key_map[name] = name
        return key_map

    def forward(
        self,
        latents: torch.Tensor,  # (B, C, H, W)
        glyph: torch.Tensor,  # (B, T, text_embed_dim)
        prior_ids: torch.Tensor,  # (B, H/p * W/p)
        prior_drop: torch.Tensor,  # (B, H/p * W/p) bool: True zeroes the prior (unconditional)
        timestep: torch.Tensor,  # (B,)
        target_size: torch.Tensor,  # (B, 2) (height, width) in pixels
        crop_coords: torch.Tensor,  # (B, 2)
        *,
        text_mask: torch.Tensor | None = None,  # (B, T), 1 = real glyph token (the reference's mask)
        text_keep: torch.Tensor | None = None,  # (B, T) bool, False = padding no query may see
        cache: ConditionKVCache | None = None,
        mode: CacheMode | None = None,
        read_rows: torch.Tensor | None = None,  # (B,) bool: rows that read the cache (default all)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # image_rotary_tables, if precomputed
    ) -> torch.Tensor:
        """Velocity (B, C, H, W)."""
        b, c, h, w = latents.shape
        p = self.config.patch_size
        rows, cols = h // p, w // p
        patches = (
            latents.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).flatten(3, 5).flatten(1, 2)
        )
        image = self.image_projector.proj(patches)
        text = self.glyph_projector(glyph)
        prior = self.prior_token_embedding(prior_ids) * (~prior_drop).unsqueeze(-1).to(image.dtype)
        image = image + self.prior_projector(prior)
        temb = self.time_condition_embed(timestep, target_size, crop_coords, image.dtype)
        if rope is None:
            rope = image_rotary_tables(rows, cols, self.config.attention_head_dim, latents.device)
        bias = self._attention_bias(text, image, text_mask, text_keep, cache, mode, read_rows)

        for i, block in enumerate(self.transformer_blocks):
            image, text = block(self.ops, image, text, temb, rope, bias, cache, mode, i, read_rows)

        scale, shift = self.norm_out.linear(temb.to(image.dtype)).chunk(2, dim=1)
        image = F.layer_norm(image, (image.shape[-1],), eps=_EPS) * (1 + scale)[:, None] + shift[:, None]
        out = self.proj_out(image).reshape(b, rows, cols, -1, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)

    @staticmethod
    def _attention_bias(text, image, text_mask, text_keep, cache, mode, read_rows) -> torch.Tensor | None:
        """The additive attention bias, or None when every row sees every key unbiased.

        ``text_mask`` is the reference's: a 0/1 *float* matrix that SDPA adds to the scores (real
        pairs +1, pairs touching glyph padding +0), reproduced as it is. ``text_keep`` and rows
        that skip the condition cache hide keys for real (-inf); these let one batched forward
        equal separate ones (e.g. CFG branches with glyph sequences of different lengths).
        """
        b, t_len, n = text.shape[0], text.shape[1], image.shape[1]
        reading = cache is not None and mode is CacheMode.READ
        stored = cache.keys[0][0].shape[2] if reading and cache.num_samples else 0
        bias = None
        if text_mask is not None:
            if reading:
                raise ValueError(
                    "text_mask with a condition cache read is not supported (nor by the reference)"
                )
            mix = torch.ones(b, t_len + n, device=image.device)
            mix[:, :t_len] = text_mask.float()
            bias = ((mix[:, :, None] * mix[:, None, :]) > 0).unsqueeze(1).to(image.dtype)
        hide = torch.zeros(b, stored + t_len + n, dtype=torch.bool, device=image.device)
        if text_keep is not None:
            hide[:, stored : stored + t_len] = ~text_keep
        if reading and read_rows is not None:
            hide[~read_rows, :stored] = True
        if text_keep is not None or (reading and read_rows is not None):
            hidden = torch.zeros(hide.shape, dtype=image.dtype, device=image.device).masked_fill_(
                hide, float("-inf")
            )
            hidden = hidden[:, None, None, :]
            bias = hidden if bias is None else bias + hidden
        return bias
