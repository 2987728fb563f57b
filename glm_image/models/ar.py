"""The GLM-Image AR text decoder: writes image tokens, one per step.

GLM-4-9B layout: token embedding, N blocks, final RMSNorm, and an lm_head over the image
vocabulary only (16512 rows: 16384 VQ codes + specials). Each block is

    x = x + post_self_attn_norm(attn(input_norm(x)))
    x = x + post_mlp_norm(mlp(post_attention_norm(x)))

with grouped-query attention (qkv bias, 32 query / 2 KV heads), M-RoPE on the first half of
each head (frequency sections [8, 12, 12] over the (t, h, w) position axes, rotate-half
convention) and a SwiGLU MLP. q/k/v are fused into one matrix at load time (one GEMM instead
of three); the checkpoint is read unchanged through ``key_map``.

Tensor parallel (``glm_image.parallel``): built with a ``tp`` group of several ranks, the model
holds its rank's shard (``parallel.layout.ArShard``: its query and KV heads, its slice of the
MLP and of the image vocabulary), reads only that from the checkpoint, all-reduces the attention
and MLP outputs (one each per layer) and gathers the logits over the vocabulary. With the
default one-process group every collective is the identity.

The model is stateless apart from its weights: the caller owns the static KV cache and says
where each step's keys and values go (``slots``) and which cache slots each query may see. The
maths runs through an ops backend (``self.ops``, see ``glm_image.ops``): the reference ``sdpa``
unless the engine chose another. The residual stream is carried as in fused inference engines:
each sandwich norm, the residual add and the next pre-norm are one ``add_rms_norm`` call.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ArTextConfig
from ..ops import Ops, TorchOps
from ..parallel.comm import SINGLE, Comm
from ..parallel.layout import ArShard
from ..weights import Fuse, Part

__all__ = ["ArModel", "KVCache", "rotary_tables"]


class RMSNorm(nn.Module):
    """The weight of one RMSNorm; the maths is ``ops.rms_norm`` / ``ops.add_rms_norm``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


def rotary_tables(
    positions: torch.Tensor, config: ArTextConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for M-RoPE: positions (3, B, T) -> two (B, T, rotary_dim) tables.

    Frequency ``i`` of the rotated half takes its angle from the t, h or w position according
    to ``mrope_section`` (the first 8 frequencies from t, the next 12 from h, the last 12 from
    w for the released model); the table is repeated for the two halves of rotate-half. The
    sin table carries rotate-half's sign (-sin on the first half), see ``Ops.rotary_``.
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


class KVCache:
    """Static keys and values for every layer: (B, KV heads, capacity, head_dim), allocated once.
    ``kv_heads``: the heads this process holds (a tensor-parallel rank's, ``ArModel.shard.kv``);
    default all of them."""

    def __init__(
        self,
        config: ArTextConfig,
        batch: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
        kv_heads: int | None = None,
    ) -> None:
        kv = config.num_key_value_heads if kv_heads is None else kv_heads
        shape = (config.num_hidden_layers, batch, kv, capacity, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity


class Attention(nn.Module):
    """This process's heads (all of them, or a tensor-parallel rank's ``shard``); ``o_proj``'s
    output is then a partial sum that the model all-reduces."""

    def __init__(self, config: ArTextConfig, shard: ArShard) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = shard.heads, shard.kv, config.head_dim
        self.qkv_proj = nn.Linear(
            config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, hidden), normed
        ops: Ops,
        rope: tuple[torch.Tensor, torch.Tensor],  # (B, T, rotary_dim) each
        cache: KVCache,
        layer: int,
        slots: torch.Tensor,  # (T,) cache slots written by this step; window: (B, KV, T, D) per row
        mask: torch.Tensor | None,  # prefill: (B, 1, T, T) True = may attend
        visible: torch.Tensor | None,  # decode, window: (B, capacity) the row's open slots
        length: int | torch.Tensor | None,  # decode, window: no visible slot at or past it (see Ops)
    ) -> torch.Tensor:
        b, t, _ = x.shape
        heads, kv = self.heads, self.kv_heads
        qkv = self.qkv_proj(x).view(b, t, heads + 2 * kv, self.head_dim)
        ops.rotary_(qkv[:, :, : heads + kv], *rope)  # q and k heads together, in place
        q = qkv[:, :, :heads].transpose(1, 2)  # (B, H, T, D)
        k = qkv[:, :, heads : heads + kv].transpose(1, 2)  # (B, KV, T, D)
        v = qkv[:, :, heads + kv :].transpose(1, 2)

        keys, values = cache.keys[layer], cache.values[layer]  # (B, KV, capacity, D)
        if slots.dim() == 1:
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
        else:  # a window: each row writes at its own slots
            keys.scatter_(2, slots, k)
            values.scatter_(2, slots, v)
        scale = self.head_dim**-0.5
        if visible is None:
            out = ops.attention(q, keys[:, :, :t], values[:, :, :t], mask=mask, scale=scale)
        elif slots.dim() == 1:
            out = ops.decode_attention(q, keys, values, visible, scale=scale, length=length)
        else:  # a window: query t of row b sees the open slots up to its own (causal, per-row offsets)
            query_slots = slots[:, 0, :, 0]  # (B, T): a view of the scatter index, no copy
            out = ops.window_attention(q, keys, values, visible, query_slots, scale=scale, length=length)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, heads * self.head_dim))


class Mlp(nn.Module):
    """[gate; up] of this process's slice of the intermediate size (``shard.mlp``)."""

    def __init__(self, config: ArTextConfig, shard: ArShard) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * shard.intermediate, bias=False)
        self.down_proj = nn.Linear(shard.intermediate, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_up_proj(x)))


class Block(nn.Module):
    """x += post_self_attn_norm(attn(input_norm(x))); x += post_mlp_norm(mlp(post_attention_norm(x)))

    (``ArModel.forward`` runs the norms and residual adds through ``ops.add_rms_norm``.)
    """

    def __init__(self, config: ArTextConfig, shard: ArShard) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config, shard)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = Mlp(config, shard)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)


class ArModel(nn.Module):
    """Embeddings -> blocks -> norm -> lm_head over the image vocabulary."""

    # The ViT and VQ quantizer share the checkpoint folder; they tokenize input images and live
    # in models/vision.py, so the text decoder deliberately leaves them unread.
    UNUSED_CHECKPOINT_PREFIXES = ("model.visual.", "model.vqmodel.")

    def __init__(self, config: ArTextConfig, ops: Ops | None = None, tp: Comm = SINGLE) -> None:
        """``tp``: the tensor-parallel group this process is a rank of (default: one process)."""
        super().__init__()
        self.config = config
        self.ops: Ops = ops or TorchOps()
        self.tp = tp
        self.shard = shard = ArShard.of(config, tp.rank, tp.size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, shard) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, shard.vocab_size, bias=False)

    def checkpoint_key_map(self) -> dict[str, str | Part | Fuse]:
        """Our parameter names -> the checkpoint's (``vision_language_encoder/``), q/k/v fused;
        a tensor-parallel rank reads ``Part``s: its rows of qkv, gate_up and the head, its
        columns of o_proj and down_proj."""
        shard, d, inter = self.shard, self.config.head_dim, self.config.intermediate_size
        split = shard.size > 1

        def part(name: str, dim: int, start: int, stop: int) -> str | Part:
            return Part(name, dim, start, stop) if split else name

        (q0, q1), (k0, k1), (m0, m1) = shard.q_heads, shard.kv_heads, shard.mlp
        key_map: dict[str, str | Part | Fuse] = {}
        for name in self.state_dict():
            full = f"model.language_model.{name}"
            if name.startswith("lm_head."):
                key_map[name] = part(name, 0, *shard.vocab)
            elif name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
                prefix, kind = name.rsplit(".qkv_proj.", 1)
                q, k, v = (f"model.language_model.{prefix}.{p}_proj.{kind}" for p in "qkv")
                rows = ((q, q0, q1), (k, k0, k1), (v, k0, k1))
                key_map[name] = Fuse(tuple(part(n, 0, a * d, b * d) for n, a, b in rows))
            elif name.endswith("o_proj.weight"):
                key_map[name] = part(full, 1, q0 * d, q1 * d)
            elif name.endswith("gate_up_proj.weight") and split:
                key_map[name] = Fuse((part(full, 0, m0, m1), part(full, 0, inter + m0, inter + m1)))
            elif name.endswith("down_proj.weight"):
                key_map[name] = part(full, 1, m0, m1)
            else:
                key_map[name] = full
        return key_map

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        rope: tuple[torch.Tensor, torch.Tensor],  # (B, T, rotary_dim) each, from rotary_tables
        cache: KVCache,
        slots: torch.Tensor,  # (T,) cache slots this step writes; window: (B, T), per row
        *,
        mask: torch.Tensor | None = None,  # prefill (slots 0..T-1): (B, 1, T, T) bool, True = attend
        visible: torch.Tensor | None = None,  # decode, window: (B, capacity), the row's open slots
        length: int | torch.Tensor | None = None,  # decode, window: a bound on the visible slots
    ) -> torch.Tensor:
        """Hidden states after the final norm, (B, T, hidden); K/V written into ``cache``.

        Three kinds of call: the prefill (``mask``; the prompt at slots 0..T-1), a decode step
        (one token per row at shared ``slots``, ``visible`` (B, capacity)), and a window (T
        tokens per row at per-row ``slots`` (B, T): speculative decoding, where rows have
        accepted different numbers of tokens, and the scheduler's rows at their own positions).
        A window's token t of row b sees the slots ``visible[b]`` holds up to its own,
        ``slots[b, t]`` (``ops.window_attention``: causal, no dense mask). An int ``length`` lets
        decode and window attention skip the cache's tail.
        """
        ops, eps, layers, tp = self.ops, self.config.rms_norm_eps, self.layers, self.tp
        if slots.dim() == 2:  # the scatter index of every layer's K/V write: (B, KV, T, D)
            b, t = slots.shape
            kv, d = self.shard.kv, self.config.head_dim
            slots = slots.view(b, 1, t, 1).expand(b, kv, t, d)
        attend = {"mask": mask, "visible": visible, "length": length}
        residual = self.embed_tokens(input_ids)
        h = ops.rms_norm(residual, layers[0].input_layernorm.weight, eps)
        for i, block in enumerate(layers):
            out = tp.all_reduce(block.self_attn(h, ops, rope, cache, i, slots, **attend))
            h, residual = ops.add_rms_norm(
                out,
                residual,
                block.post_attention_layernorm.weight,
                eps,
                pre_weight=block.post_self_attn_layernorm.weight,
            )
            out = tp.all_reduce(block.mlp(h, ops))
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            h, residual = ops.add_rms_norm(
                out, residual, following.weight, eps, pre_weight=block.post_mlp_layernorm.weight
            )
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Image-vocabulary logits in float32 (the sampler's precision); under tensor parallel
        every rank's slice of the vocabulary, gathered (every rank gets them all)."""
        return self.tp.all_gather(self.lm_head(hidden), dim=-1).float()
