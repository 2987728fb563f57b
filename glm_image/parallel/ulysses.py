"""Ulysses sequence parallelism for the DiT: all-to-all between sequence and heads.

Each of the ``sp`` ranks holds an equal chunk of the text stream and an equal chunk of the image
stream, so its piece of the joint sequence is [its text; its image] (``chunk``). Everything but
attention works token by token on that piece. Around attention:

- ``to_heads``: every rank's q, k, v (B, H, S/sp, D) -> this rank's H/sp heads over the whole
  sequence (B, H/sp, S, D), the sequence reassembled as [all text; all image] (the order of one
  process), so the attention, its key groups and the condition K/V cache see exactly what one
  process sees, for their heads;
- ``to_sequence``: the attention output (B, S, H/sp, D) back to this rank's tokens with every
  head (B, S/sp, H, D).

With one rank every function returns its input (``SINGLE``).
"""

from __future__ import annotations

import torch

from ..errors import GlmImageError
from .comm import Comm

__all__ = ["chunk", "gather", "to_heads", "to_sequence"]


def chunk(sp: Comm, x: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's equal chunk of ``x`` along ``dim`` (a view)."""
    if sp.size == 1:
        return x
    length = x.shape[dim]
    if length % sp.size:
        raise GlmImageError(
            f"dit_sp = {sp.size}: a sequence of {length} tokens does not split into {sp.size} equal chunks"
        )
    part = length // sp.size
    return x.narrow(dim, sp.rank * part, part)


def gather(sp: Comm, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's chunk along ``dim``, in rank order: the inverse of ``chunk``."""
    return sp.all_gather(x, dim=dim)


def to_heads(sp: Comm, tensors: tuple[torch.Tensor, ...], text: int) -> tuple[torch.Tensor, ...]:
    """(B, H, S_local, D) each, S_local = ``text`` + this rank's image tokens -> (B, H/sp, S, D)
    each, the sequence [text of every rank; image of every rank]. One all-to-all for all."""
    if sp.size == 1:
        return tensors
    x = torch.stack(tensors)  # (n, B, H, S_local, D)
    n, b, h, s, d = x.shape
    x = x.view(n, b, sp.size, h // sp.size, s, d).permute(2, 0, 1, 3, 4, 5)  # (sp, n, B, h, S_local, D)
    x = sp.all_to_all(x)  # chunk i: rank i's tokens, this rank's heads

    def joined(part: torch.Tensor) -> torch.Tensor:  # (sp, n, B, h, L, D) -> (n, B, h, sp * L, D)
        return part.permute(1, 2, 3, 0, 4, 5).reshape(n, b, h // sp.size, -1, d)

    out = torch.cat([joined(x[..., :text, :]), joined(x[..., text:, :])], dim=3)
    return out.unbind(0)


def to_sequence(sp: Comm, x: torch.Tensor, text: int) -> torch.Tensor:
    """(B, S, H/sp, D), the sequence [all text; all image] -> this rank's tokens (B, S_local, H, D),
    ``text`` of them text (the inverse of ``to_heads``)."""
    if sp.size == 1:
        return x
    b, _s, h, d = x.shape
    texts = text * sp.size
    local = torch.cat(
        [x[:, :texts].reshape(b, sp.size, text, h, d), x[:, texts:].reshape(b, sp.size, -1, h, d)], dim=2
    )  # (B, sp, S_local, h, D): rank j's tokens at [:, j]
    x = sp.all_to_all(local.transpose(0, 1))  # chunk i: this rank's tokens, rank i's heads
    return x.permute(1, 2, 0, 3, 4).reshape(b, -1, sp.size * h, d)
