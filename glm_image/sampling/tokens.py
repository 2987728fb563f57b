"""Token sampling as pure functions: logits in, filtered logits or token ids out.

The filters follow transformers' logits warpers step for step (temperature, then top-k, then
top-p; ``-inf`` marks a removed token), so the same logits give the same kept set. Drawing
follows ``torch.multinomial(probs, 1)``: for one sample it is ``argmax(probs / q)`` with
``q ~ Exp(1)``, so a row drawn with a generator seeded ``s`` equals the reference's draw after
``torch.manual_seed(s)``. Every row has its own generator (one seed per image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "apply_filters", "draw", "greedy", "top_k_filter", "top_p_filter"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; the defaults of the released model come from generation_config.json."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature} must be > 0 (use greedy decoding for 0)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k} must be >= 0 (0 or None: no top-k)")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``p`` (nucleus); at least one."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_filters(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, in that order, on float32 logits (B, V)."""
    logits = logits.float()
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        logits = top_k_filter(logits, params.top_k)
    return top_p_filter(logits, params.top_p)


def draw(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of filtered logits (B, V), row ``i`` drawn with ``generators[i]``."""
    if len(generators) != logits.shape[0]:
        raise ValueError(f"{len(generators)} generators for {logits.shape[0]} rows")
    probs = logits.softmax(dim=-1)
    q = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        q[row].exponential_(generator=generator)
    return (probs / q).argmax(dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row (B, V) -> (B,)."""
    return logits.argmax(dim=-1)
