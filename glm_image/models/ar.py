"""The GLM-Image AR text decoder: writes image tokens, one per step.

GLM-4-9B layout: token embedding, N blocks, final RMSNorm, and an lm_head over the image
vocabulary only (16512 rows: 16384 VQ codes + specials). Each block is

    x = x + post_self_attn_norm(attn(input_norm(x)))
    x = x + post_mlp_norm(mlp(post_attention_norm(x)))

with grouped-query attention (qkv bias, 32 query / 2 KV heads), M-RoPE on the first half of
each head (frequency sections [8, 12, 12] over the (t, h, w) position axes, rotate-half
convention) and a SwiGLU MLP. q/k/v are fused into one matrix at load time (one GEMM instead
of three); the checkpoint is read unchanged through ``key_map``.

The model is stateless apart from its weights: the caller owns the static KV cache and says
where each step's keys and values go (``slots``) and which cache slots each query may see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ArTextConfig
from ..weights import Fuse

__all__ = ["ArModel", "KVCache", "rotary_tables"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype, as the reference does.
        h = x.float()
        scale = h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return self.weight * (h * scale).to(x.dtype)


def rotary_tables(
    positions: torch.Tensor, config: ArTextConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for M-RoPE: positions (3, B, T) -> two (B, T, rotary_dim) tables.

    Frequency ``i`` of the rotated half takes its angle from the t, h or w position according
    to ``mrope_section`` (the first 8 frequencies from t, the next 12 from h, the last 12 from
    w for the released model); the table is repeated for the two halves of rotate-half. The
    sin table carries rotate-half's sign (-sin on the first half), see ``_rotate_``.
    """
    half = config.rotary_dim // 2
    inv_freq = 1.0 / (
        config.rope_theta
        ** (torch.arange(0, half, device=positions.device, dtype=torch.float32) * 2 / config.rotary_dim)
    )
    angles = positions[..., None].float() * inv_freq  # (3, B, T, half)
    axis = torch.repeat_interleave(
        torch.arange(3, device=positions.device), torch.tensor(config.mrope_section, device=positions.device)
    )  # (half,): which position axis drives each frequency
    angles = angles.gather(0, axis.view(1, 1, 1, half).expand(1, *angles.shape[1:])).squeeze(0)
    cos, sin = angles.cos(), angles.sin()  # (B, T, half)
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """Rotate the first rotary_dim channels of x (B, T, heads, D) in place; tables (B, T, 1, rot).

    rotate_half(x) * sin == roll(x, half) * signed_sin exactly (a sign flip is exact), so this
    is the reference's ``x * cos + rotate_half(x) * sin``, product for product, in 4 ops.
    """
    rot = cos.shape[-1]
    x_rot = x[..., :rot]
    rolled = torch.roll(x_rot, rot // 2, dims=-1).mul_(signed_sin)
    x_rot.mul_(cos).add_(rolled)


class KVCache:
    """Static keys and values for every layer: (B, KV heads, capacity, head_dim), allocated once."""

    def __init__(
        self, config: ArTextConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity


class Attention(nn.Module):
    def __init__(self, config: ArTextConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.qkv_proj = nn.Linear(
            config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, hidden)
        rope: tuple[torch.Tensor, torch.Tensor],  # (B, T, rotary_dim) each
        cache: KVCache,
        layer: int,
        slots: torch.Tensor,  # (T,) cache slots written by this step
        mask: torch.Tensor,  # (B, 1, T, S) True = may attend
        window: int,  # attend over cache slots [0, window)
    ) -> torch.Tensor:
        b, t, _ = x.shape
        heads, kv = self.heads, self.kv_heads
        qkv = self.qkv_proj(x).view(b, t, heads + 2 * kv, self.head_dim)
        cos, sin = (r.unsqueeze(2) for r in rope)
        _rotate_(qkv[:, :, : heads + kv], cos, sin)  # q and k heads together
        q = qkv[:, :, :heads].transpose(1, 2)  # (B, H, T, D)
        k = qkv[:, :, heads : heads + kv].transpose(1, 2)  # (B, KV, T, D)
        v = qkv[:, :, heads + kv :].transpose(1, 2)

        cache.keys[layer].index_copy_(2, slots, k)
        cache.values[layer].index_copy_(2, slots, v)
        keys = cache.keys[layer, :, :, :window]
        values = cache.values[layer, :, :, :window]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.head_dim**-0.5, enable_gqa=self.heads != self.kv_heads
        )  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, config: ArTextConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class Block(nn.Module):
    def __init__(self, config: ArTextConfig) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = Mlp(config)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x: torch.Tensor, layer: int, **attn: object) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), layer=layer, **attn))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class ArModel(nn.Module):
    """Embeddings -> blocks -> norm -> lm_head over the image vocabulary."""

    # The ViT and VQ quantizer share the checkpoint folder; they tokenize input images and live
    # in models/vision.py, so the text decoder deliberately leaves them unread.
    UNUSED_CHECKPOINT_PREFIXES = ("model.visual.", "model.vqmodel.")

    def __init__(self, config: ArTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vision_vocab_size, bias=False)

    def checkpoint_key_map(self) -> dict[str, str | Fuse]:
        """Our parameter names -> the checkpoint's (``vision_language_encoder/``), q/k/v fused."""
        key_map: dict[str, str | Fuse] = {}
        for name in self.state_dict():
            if name.startswith("lm_head."):
                key_map[name] = name
            elif name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
                prefix, kind = name.rsplit(".qkv_proj.", 1)
                key_map[name] = Fuse(tuple(f"model.language_model.{prefix}.{p}_proj.{kind}" for p in "qkv"))
            else:
                key_map[name] = f"model.language_model.{name}"
        return key_map

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        rope: tuple[torch.Tensor, torch.Tensor],  # (B, T, rotary_dim) each, from rotary_tables
        cache: KVCache,
        slots: torch.Tensor,  # (T,)
        mask: torch.Tensor,  # (B, 1, T, window) bool
        window: int,
    ) -> torch.Tensor:
        """Hidden states after the final norm, (B, T, hidden); K/V written into ``cache``."""
        x = self.embed_tokens(input_ids)
        for i, block in enumerate(self.layers):
            x = block(x, layer=i, rope=rope, cache=cache, slots=slots, mask=mask, window=window)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Image-vocabulary logits in float32 (the sampler's precision)."""
        return self.lm_head(hidden).float()
