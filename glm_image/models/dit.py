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
unconditional steps ``SKIP`` them.

Attention never takes a mask. In a batched forward, rows may see different keys: glyph
sequences of different lengths are left-padded together (the padding hidden), and under CFG only
the conditional rows read the cache. The batch is planned once per call into key groups
(``attention_groups``), runs of consecutive rows that see as many keys, and each group attends
over exactly its keys without a mask, so a GPU's SDPA keeps its FlashAttention kernel.

Sequence parallel (Ulysses, ``glm_image.parallel.ulysses``): built with an ``sp`` group of
several ranks, each rank keeps an equal chunk of the text and of the image stream from ``embed``
on; around attention one all-to-all gives each rank its heads over the whole sequence (so key
groups, glyph padding and the condition cache work as in one process, per head), another takes
them back; ``head`` gathers the velocity. The weights are the whole model on every rank.

Module names follow the checkpoint's ``transformer/`` tensors; only q/k/v are fused (one GEMM).
AdaLN modulation, QK-norm + RoPE and attention run through the ops backend (``self.ops``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DitConfig
from ..ops import Ops, TorchOps
from ..parallel import ulysses
from ..parallel.comm import SINGLE, Comm
from ..weights import Fuse

__all__ = [
    "CacheMode",
    "ConditionKVCache",
    "DitModel",
    "KeyGroup",
    "attention_groups",
    "image_rotary_tables",
    "key_groups",
    "row_groups",
    "timestep_embedding",
]

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

    def samples(self, rows: int) -> list[int]:
        """The sample each of ``rows`` reading rows reads: one sample shared by all rows, one per
        row, or each sample for as many consecutive rows (its prompt's images)."""
        n = self.num_samples
        if n == 0 or rows % n:
            raise ValueError(f"condition cache holds {n} samples; cannot serve {rows} rows (need a multiple)")
        return [row // (rows // n) for row in range(rows)]

    def rows(self, layer: int, samples: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored K/V (rows, heads, S, D) for rows reading ``samples`` (one per row)."""
        keys, values = self.keys[layer], self.values[layer]
        if len(set(samples)) == 1:  # a view, no copy: the common case (one prompt)
            shape = (len(samples), -1, -1, -1)
            return keys[samples[0]].expand(shape), values[samples[0]].expand(shape)
        return torch.cat([keys[s] for s in samples]), torch.cat([values[s] for s in samples])


@dataclass(frozen=True)
class KeyGroup:
    """Consecutive batch rows [start, stop) that see as many keys, so one attention call without
    a mask serves them all: their text keys from ``text_from`` on (the glyphs are left-padded, so
    what a row sees of them is a suffix), every image key, and in front of them, when ``samples``
    is given, the condition cache's keys of those samples (one per row)."""

    start: int
    stop: int
    text_from: int = 0
    samples: tuple[int, ...] | None = None


def key_groups(
    text_from: Sequence[int], samples: Sequence[int | None], stored: Sequence[int] = ()
) -> tuple[KeyGroup, ...]:
    """Per row, its first visible text key and the cache sample it reads (None: none); per
    sample, how many keys it stored (when samples differ in that) -> the runs of consecutive
    rows that see as many keys: the same ``text_from``, and none reading or all reading as many."""

    def seen(row: int) -> tuple[int, int | None]:
        sample = samples[row]
        return text_from[row], None if sample is None else stored[sample] if stored else 0

    groups: list[KeyGroup] = []
    start = 0
    for row in range(1, len(text_from) + 1):
        if row < len(text_from) and seen(row) == seen(start):
            continue
        reads = samples[start] is not None
        groups.append(KeyGroup(start, row, text_from[start], tuple(samples[start:row]) if reads else None))
        start = row
    return tuple(groups)


def attention_groups(
    batch: int,
    text_keep: torch.Tensor | None = None,
    cache: ConditionKVCache | None = None,
    mode: CacheMode | None = None,
    read_rows: torch.Tensor | None = None,
) -> tuple[KeyGroup, ...]:
    """The key groups of a forward over ``batch`` rows: ``text_keep`` (B, T) bool marks each
    row's real glyph tokens (a suffix: left padding; None = all real); in ``READ`` mode the rows
    ``read_rows`` (B,) bool (None = all) read the cache. Reads both back to the host, so plan it
    once per call, not per step (the engine keeps them on the CPU)."""
    text_from = [0] * batch
    if text_keep is not None:
        for row, keep in enumerate(text_keep.tolist()):
            text_from[row] = keep.count(False)
            if not all(keep[text_from[row] :]):
                raise ValueError(
                    f"text_keep row {row}: its real glyph tokens must be a suffix (left padding)"
                )
    samples: list[int | None] = [None] * batch
    stored: list[int] = []
    if cache is not None and mode is CacheMode.READ:
        reading = range(batch) if read_rows is None else read_rows.nonzero().flatten().tolist()
        for row, sample in zip(reading, cache.samples(len(reading)), strict=True):
            samples[row] = sample
        stored = [k.shape[2] for k in cache.keys[0]]
    return key_groups(text_from, samples, stored)


def row_groups(
    groups: Sequence[KeyGroup], rows: Sequence[int], cache: ConditionKVCache | None = None
) -> tuple[KeyGroup, ...]:
    """The key groups of a forward over some rows of a planned batch: ``rows`` (ascending batch
    indices) become rows 0.. of the new batch, each seeing the keys it saw in ``groups``; the
    same result as planning those rows alone. ``cache``: the one ``groups`` read, if any."""
    text_from: list[int] = []
    samples: list[int | None] = []
    for row in rows:
        group = next(g for g in groups if g.start <= row < g.stop)
        text_from.append(group.text_from)
        samples.append(None if group.samples is None else group.samples[row - group.start])
    stored = [k.shape[2] for k in cache.keys[0]] if cache is not None else []
    return key_groups(text_from, samples, stored)


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
    def __init__(self, config: DitConfig, sp: Comm = SINGLE) -> None:
        super().__init__()
        self.sp = sp
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
        groups: Sequence[KeyGroup],
        cache: ConditionKVCache | None,
        mode: CacheMode | None,
        layer: int,
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
        # sequence parallel: this rank's heads over the whole sequence, (B, heads / sp, S * sp, D)
        q, k, v = ulysses.to_heads(self.sp, (q, k, v), t_len)
        if cache is not None and mode is CacheMode.WRITE:
            cache.store(layer, k, v)
        out = _grouped_attention(ops, q, k, v, groups, cache, layer, head_dim**-0.5)  # (B, S, heads, D)
        out = ulysses.to_sequence(self.sp, out, t_len)  # back to this rank's tokens, every head
        out = self.attn1.to_out[0](out.flatten(2))
        out_txt, out_img = out.split([t_len, s - t_len], dim=1)

        image = image + out_img * gate
        text = text + out_txt * c_gate
        ff_img = self.ff(ops.layer_norm_modulate(image, scale_mlp, shift_mlp, _EPS))
        ff_txt = self.ff(ops.layer_norm_modulate(text, c_scale_mlp, c_shift_mlp, _EPS))
        return image + ff_img * gate_mlp, text + ff_txt * c_gate_mlp


def _grouped_attention(
    ops: Ops,
    q: torch.Tensor,  # (B, heads, S, D)
    k: torch.Tensor,  # (B, heads, S, D)
    v: torch.Tensor,
    groups: Sequence[KeyGroup],
    cache: ConditionKVCache | None,
    layer: int,
    scale: float,
) -> torch.Tensor:
    """Each group's rows attend over exactly the keys they see (mask=None); (B, S, heads, D).

    Every query is computed, glyph padding included: a padding query still sees its row's image
    keys, so it stays finite, and no query ever sees it as a key."""
    outs = []
    for group in groups:
        rows = slice(group.start, group.stop)
        keys, values = k[rows, :, group.text_from :], v[rows, :, group.text_from :]
        if group.samples is not None:
            stored_k, stored_v = cache.rows(layer, group.samples)
            keys, values = torch.cat([stored_k, keys], dim=2), torch.cat([stored_v, values], dim=2)
        outs.append(ops.attention(q[rows], keys, values, mask=None, scale=scale).transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class DitModel(nn.Module):
    def __init__(self, config: DitConfig, ops: Ops | None = None, sp: Comm = SINGLE) -> None:
        """``sp``: the sequence-parallel group this process is a rank of (default: one process)."""
        super().__init__()
        self.config = config
        self.ops: Ops = ops or TorchOps()
        self.sp = sp
        dim, p = config.hidden_size, config.patch_size
        self.image_projector = nn.Module()
        self.image_projector.proj = nn.Linear(config.in_channels * p * p, dim)
        self.glyph_projector = FeedForward(config.text_embed_dim, dim, dim, F.gelu)
        self.prior_token_embedding = nn.Embedding(config.prior_vq_quantizer_codebook_size, dim)
        self.prior_projector = FeedForward(dim, dim, dim, F.silu)
        self.time_condition_embed = _Conditioning(config)
        self.transformer_blocks = nn.ModuleList(Block(config, sp) for _ in range(config.num_layers))
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
        text_keep: torch.Tensor | None = None,  # (B, T) bool, False = left padding no query may see
        cache: ConditionKVCache | None = None,
        mode: CacheMode | None = None,
        read_rows: torch.Tensor | None = None,  # (B,) bool: rows that read the cache (default all)
        groups: Sequence[KeyGroup] | None = None,  # attention_groups(...), if planned once per call
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # image_rotary_tables, if precomputed
    ) -> torch.Tensor:
        """Velocity (B, C, H, W). Which keys each row sees: ``groups``, or else ``text_keep`` and
        ``read_rows`` (turned into groups here, reading them back to the host).

        The forward is ``embed``, ``blocks`` over every layer, ``head``: a step cache runs the
        same three pieces itself, so a step it does not cache computes exactly this."""
        b, _, h, w = latents.shape
        if groups is None:
            groups = attention_groups(b, text_keep, cache, mode, read_rows)
        elif text_keep is not None or read_rows is not None:
            raise ValueError("give groups or text_keep/read_rows, not both")
        _check_groups(groups, b, cache is not None and mode is CacheMode.READ)
        image, text, temb = self.embed(
            latents, glyph, prior_ids, prior_drop, timestep, target_size, crop_coords
        )
        if rope is None:
            p = self.config.patch_size
            rope = image_rotary_tables(h // p, w // p, self.config.attention_head_dim, latents.device)
        layers = range(len(self.transformer_blocks))
        image, _ = self.blocks(image, text, temb, rope, groups, cache, mode, layers)
        return self.head(image, temb, h, w)

    def embed(
        self,
        latents: torch.Tensor,  # (B, C, H, W)
        glyph: torch.Tensor,  # (B, T, text_embed_dim)
        prior_ids: torch.Tensor,  # (B, H/p * W/p)
        prior_drop: torch.Tensor,  # (B, H/p * W/p) bool
        timestep: torch.Tensor,  # (B,)
        target_size: torch.Tensor,  # (B, 2)
        crop_coords: torch.Tensor,  # (B, 2)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The image stream (B, N, dim), the text stream (B, T, dim) and the conditioning (B, time_dim);
        under sequence parallel this rank's chunk of each stream (N / sp and T / sp tokens)."""
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
        return ulysses.chunk(self.sp, image, 1), ulysses.chunk(self.sp, text, 1), temb

    def blocks(
        self,
        image: torch.Tensor,  # (B, N, dim)
        text: torch.Tensor,  # (B, T, dim)
        temb: torch.Tensor,  # (B, time_dim)
        rope: tuple[torch.Tensor, torch.Tensor],
        groups: Sequence[KeyGroup],
        cache: ConditionKVCache | None,
        mode: CacheMode | None,
        layers: range,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams after the blocks ``layers`` (consecutive); ``groups`` cover these B rows.
        ``rope``: the whole image grid's table (a rank takes its chunk)."""
        rope = tuple(ulysses.chunk(self.sp, r, 0) for r in rope)
        for i in layers:
            image, text = self.transformer_blocks[i](
                self.ops, image, text, temb, rope, groups, cache, mode, i
            )
        return image, text

    def head(self, image: torch.Tensor, temb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final AdaLN, projection and unpatchify: the image stream (B, N, dim) -> velocity (B, C, H, W);
        ``height``, ``width``: the latents' H and W."""
        b, p = image.shape[0], self.config.patch_size
        scale, shift = self.norm_out.linear(temb.to(image.dtype)).chunk(2, dim=1)
        image = F.layer_norm(image, (image.shape[-1],), eps=_EPS) * (1 + scale)[:, None] + shift[:, None]
        out = ulysses.gather(self.sp, self.proj_out(image), dim=1)  # every rank's tokens
        out = out.reshape(b, height // p, width // p, -1, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)


def _check_groups(groups: Sequence[KeyGroup], batch: int, reading: bool) -> None:
    """The groups cover the batch's rows in order, and rows read the cache only in a read."""
    covered = 0
    for group in groups:
        if group.start != covered or group.stop <= group.start:
            break
        covered = group.stop
    if covered != batch:
        raise ValueError(f"groups must cover rows 0..{batch} in order; got {list(groups)}")
    if not reading and any(g.samples is not None for g in groups):
        raise ValueError("groups read the condition cache, but this forward does not (mode is not READ)")
