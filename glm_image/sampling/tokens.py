"""Token sampling as pure functions: logits in, filtered logits or token ids out.

The filters follow transformers' logits warpers step for step (temperature, then top-k, then
top-p; ``-inf`` marks a removed token), so the same logits give the same kept set. Drawing
follows ``torch.multinomial(probs, 1)``: for one sample it is ``argmax(probs / q)`` with
``q ~ Exp(1)``, so a row whose noise comes from a generator seeded ``s`` equals the reference's
draw after ``torch.manual_seed(s)``. Every row has its own generator (one seed per image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "SamplingParams",
    "apply_filters",
    "draw_with_noise",
    "exponential_noise",
    "top_k_filter",
    "top_p_filter",
]


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
    if logits.device.type == "cpu" and logits.dim() == 2:
        threshold = _top_p_threshold(logits, p)
        if threshold is not None:
            return logits.masked_fill(logits < threshold, float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def _top_p_threshold(logits: torch.Tensor, p: float) -> torch.Tensor | None:
    """The smallest kept logit of each row (B, 1): tokens below it are what top-p removes.

    ``top_p_filter`` without sorting indices: bit-identical, several times faster on a CPU.

    The reference's decision depends only on the sorted *values* (softmax and cumsum over them),
    and the removed tokens are a prefix of that order: everything below the smallest kept value.
    NumPy sorts values alone far faster than ``torch.sort`` sorts with indices. Returns None when
    a tie straddles the cut, where only the reference's own ordering decides (rare; the caller
    then takes the sorting path).
    """
    import numpy as np

    values = np.sort(logits.detach().numpy(), axis=-1)
    cumulative = torch.from_numpy(values).softmax(dim=-1).cumsum(dim=-1)
    # cumulative is non-decreasing, so "how many entries are <= 1 - p" is a binary search
    # (the comparison in float32, as the reference's tensor-scalar comparison makes it)
    cut = torch.full((values.shape[0], 1), 1 - p, dtype=cumulative.dtype)
    removed = torch.searchsorted(cumulative, cut, right=True).numpy()[:, 0].clip(max=values.shape[-1] - 1)
    rows = np.arange(values.shape[0])
    threshold = values[rows, removed]
    if ((removed > 0) & (values[rows, np.maximum(removed - 1, 0)] == threshold)).any():
        return None
    return torch.from_numpy(threshold[:, None].copy())


def apply_filters(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, in that order, on float32 logits (B, V)."""
    original = logits
    logits = logits.float()
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0 and logits.device.type == "cpu":
        # the hot path: mask in place, on a copy only if nothing above made one already
        threshold = _top_p_threshold(logits, params.top_p)
        if threshold is not None:
            owned = logits.clone() if logits is original else logits
            return owned.masked_fill_(owned < threshold, float("-inf"))
    return top_p_filter(logits, params.top_p)


def exponential_noise(
    generators: Sequence[torch.Generator], steps: int, vocab: int, device: torch.device | str
) -> torch.Tensor:
    """(B, steps, vocab) Exp(1) noise: row ``i`` holds ``steps`` successive draws of
    ``generators[i]``, step by step, i.e. the noise one draw per step would use.

    On a CPU torch samples serially from the Mersenne Twister, so one call over ``steps`` rows
    gives exactly the numbers of ``steps`` separate calls (tested); on CUDA the numbers depend on
    how the draws are grouped, so a caller must keep its grouping fixed to be reproducible.
    """
    noise = torch.empty((len(generators), steps, vocab), device=device)  # (B, steps, V)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    return noise


def draw_with_noise(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One token per row of filtered logits (B, V) given its Exp(1) noise (B, V):
    ``argmax(softmax(logits) / noise)``, which is ``torch.multinomial(softmax(logits), 1)``."""
    probs = logits.softmax(dim=-1)
    return torch.div(probs, noise).argmax(dim=-1)
