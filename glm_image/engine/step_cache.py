"""DiT step caching (first-block cache): a step reuses the residual of the blocks after the first
when the first block's residual has barely changed since the last step that ran them all.

The DiT engine's step loop consults a ``StepCache``; the model stays stateless. Every step runs
the embeddings and block 0 on every row, and hands the policy the image stream before and after
block 0. Per row (one image in one CFG branch) the policy compares that residual, the probe, with
the probe of the row's last computed step (relative L1 change):

    change = mean |probe_t - probe_last| / mean |probe_last|

Below ``threshold``, after ``warmup`` steps and at most ``max_consecutive`` times in a row, the row
skips blocks 1.. and adds the residual they gave at its last computed step (the image stream after
the last block minus after block 0), with ``taylor`` extrapolated to first order in the step index
from its last two computed steps (TaylorSeer). The other rows run blocks 1.. together, a batch of
just those rows (the mixed case: under CFG one branch may be cached and the other not).

Rows decide alone, not per batch or per branch pair: an image's steps then depend on its own
changes only, so a batch still gives each image what it gives alone (up to rounding). The
condition images' K/V write runs before the step loop and is never cached; a step that caches a
row still reads the condition cache in block 0.

Several devices: under sequence parallel each rank holds a chunk of every row's image stream, so
the probe's two means are averaged over the SP ranks (gathered, then reduced in the same order
everywhere): every rank of the group makes the same decision for a row. Under CFG-parallel each
rank runs the rows of its branch; ``join_branches`` puts the counts together at the end.

Counting: a row's step computes ``num_layers`` blocks, or 1 when cached. Per image, ``forwards``
is its blocks over all steps and branches divided by ``num_layers``: transformer passes, a cached
branch-step counting 1/num_layers (its probe). Uncached with CFG that is 2 per step, the count of
the reference pipeline, which runs one forward per branch.
"""

from __future__ import annotations

import torch

from ..parallel.comm import SINGLE, Comm
from .choices import StepCacheOptions

__all__ = ["StepCache", "StepCacheOptions"]


class StepCache:
    """One denoising call's cache: build one per call (``DitEngine.denoise`` starts it), read
    ``forwards`` after it. Rows are the batch rows of the engine's forward: with CFG the
    conditional rows of images 0..B-1, then their unconditional rows."""

    def __init__(self, options: StepCacheOptions | None = None) -> None:
        self.options = options or StepCacheOptions()
        self.options.check()
        self.start(0, 1, 1)

    @property
    def active(self) -> bool:
        """False when no step can be cached: the engine then runs the blocks as without a cache."""
        return self.options.threshold > 0 and self.options.max_consecutive > 0

    def start(self, images: int, branches: int, layers: int, sp: Comm = SINGLE) -> None:
        """Forget everything: a call over ``images`` images, ``branches`` rows each, a DiT of
        ``layers``; ``sp``: the sequence-parallel group that shares each row's image stream."""
        self._images, self._layers, self._sp = images, layers, sp
        rows = images * branches
        self._blocks = [0] * rows  # blocks computed per row, for ``forwards``
        self._run = [0] * rows  # cached steps in a row
        self._last: list[int | None] = [None] * rows  # step of the stored residual
        self._prev: list[int | None] = [None] * rows  # step of the one before (TaylorSeer)
        self._probe: torch.Tensor | None = None  # (rows, N, dim) block 0's residual at ``_last``
        self._residual: torch.Tensor | None = None  # (rows, N, dim) blocks 1..'s residual at ``_last``
        self._prev_residual: torch.Tensor | None = None  # the same at ``_prev``

    @property
    def forwards(self) -> list[float]:
        """Per image, the transformer passes its rows computed (see the module docstring)."""
        per_image = [0] * self._images
        for row, blocks in enumerate(self._blocks):
            per_image[row % self._images] += blocks
        return [blocks / self._layers for blocks in per_image]

    def gather(self, parts: list[StepCache]) -> None:
        """Hold the counts of ``parts``, the caches of one call's images run one by one (image i in
        ``parts[i]``), as if the images had run together: ``forwards`` lists them in order."""
        branches = len(parts[0]._blocks) // max(parts[0]._images, 1)
        self.start(len(parts), branches, parts[0]._layers, parts[0]._sp)
        for i, part in enumerate(parts):
            for branch in range(branches):
                self._blocks[branch * len(parts) + i] = part._blocks[branch]

    def decide(self, step: int, before: torch.Tensor, after: torch.Tensor) -> list[int]:
        """The rows that run blocks 1.. at ``step`` (ascending); the others take ``predict``.
        ``before``, ``after``: the image stream (rows, N, dim) around block 0."""
        rows = len(self._blocks)
        options, cached = self.options, set()
        probe = after - before if self.active else None
        eligible = [
            r
            for r in range(rows)
            if self._last[r] is not None and step >= options.warmup and self._run[r] < options.max_consecutive
        ]
        if probe is not None and eligible:
            index = torch.tensor(eligible, device=after.device)
            now, last = probe[index], self._probe[index]
            if self._sp.size == 1:
                change = torch.mean((now - last).abs(), dim=(1, 2), dtype=torch.float32) / torch.mean(
                    last.abs(), dim=(1, 2), dtype=torch.float32
                )
            else:
                change = self._shared_change(now, last)
            # one read back to the host per step: which rows run is a host decision
            cached = {r for r, c in zip(eligible, change.tolist(), strict=True) if c < options.threshold}
        compute = [r for r in range(rows) if r not in cached]
        for r in range(rows):
            self._blocks[r] += 1 if r in cached else self._layers
            self._run[r] = self._run[r] + 1 if r in cached else 0
        if probe is not None and len(compute) == rows:  # every row: keep the tensor, no scatter
            self._probe = probe
        elif probe is not None and compute:
            if self._probe is None:
                self._probe = torch.zeros_like(probe)
            index = torch.tensor(compute, device=after.device)
            self._probe[index] = probe[index]
        return compute

    def _shared_change(self, now: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The relative change over the whole image when each SP rank holds an equal chunk of it:
        every rank's two means, gathered, averaged in rank order (the same numbers everywhere)."""
        means = torch.stack(
            [
                torch.mean((now - last).abs(), dim=(1, 2), dtype=torch.float32),
                torch.mean(last.abs(), dim=(1, 2), dtype=torch.float32),
            ]
        )  # (2, rows)
        numerator, denominator = self._sp.all_gather(means[None], dim=0).mean(dim=0)
        return numerator / denominator

    def join_branches(self, cfg: Comm) -> None:
        """CFG-parallel: this rank ran one branch's rows; after the call, take every rank's counts
        (in branch order), so ``forwards`` counts both branches as one process does."""
        blocks = torch.tensor(self._blocks, dtype=torch.long, device=cfg.device)
        self._blocks = cfg.all_gather(blocks, dim=0).tolist()

    def record(self, step: int, rows: list[int], before: torch.Tensor, after: torch.Tensor) -> None:
        """The computed ``rows`` ran blocks 1..: keep their residual. ``before``, ``after``: those
        rows' image streams (len(rows), N, dim) after block 0 and after the last block."""
        if not self.active or not rows:
            return
        if len(rows) == len(self._blocks):  # every row: keep the tensors, no gather or scatter
            if self.options.taylor:
                last = self._residual
                self._prev_residual = last if last is not None else torch.zeros_like(after)
            self._residual = after - before
        else:
            index = torch.tensor(rows, device=after.device)
            if self._residual is None:
                self._residual = after.new_zeros((len(self._blocks), *after.shape[1:]))
                self._prev_residual = torch.zeros_like(self._residual) if self.options.taylor else None
            if self._prev_residual is not None:
                self._prev_residual[index] = self._residual[index]
            self._residual[index] = after - before
        for r in rows:
            self._prev[r], self._last[r] = self._last[r], step

    def predict(self, step: int, rows: list[int]) -> torch.Tensor:
        """The residual of blocks 1.. (len(rows), N, dim) for the cached ``rows`` at ``step``."""
        index = torch.tensor(rows, device=self._residual.device)
        residual = self._residual[index]
        if self._prev_residual is None:
            return residual
        # first order in the step index, from the row's last two computed steps (none: zeroth)
        slope = [
            0.0 if self._prev[r] is None else (step - self._last[r]) / (self._last[r] - self._prev[r])
            for r in rows
        ]
        slope = torch.tensor(slope, dtype=residual.dtype, device=residual.device)[:, None, None]
        return residual + slope * (residual - self._prev_residual[index])
