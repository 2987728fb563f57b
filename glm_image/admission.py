"""What a server admits under its memory plan: each request (and each batch of requests the queue
would join into one engine call) is held only if its estimate (``residency.estimate_memory``)
fits the plan's budget. At startup the server states the largest request it holds, lowered from
the largest it would otherwise take (the largest size, the most images per call, the most
condition images) where memory cannot hold that."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .residency import MemoryPlan, estimate_memory

__all__ = ["Admission", "plan_admission"]


@dataclass(frozen=True)
class Admission:
    """The largest request held: one image up to ``max_side`` x ``max_side``; at that size up to
    ``batch`` images per engine call and ``conditions`` condition images per prompt;
    ``peak_bytes``: the estimate for ``batch`` images at ``max_side`` (with ``conditions`` too
    when nothing was lowered); ``lowered``: what was lowered from the asked
    maximum and why (None: nothing). ``check`` and ``fits`` estimate any other request."""

    plan: MemoryPlan
    root: Path
    dtype: torch.dtype
    max_side: int
    batch: int
    conditions: int
    peak_bytes: int
    lowered: str | None
    _peaks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def budget(self) -> int | None:
        return self.plan.budget

    def peak(self, height: int, width: int, images: int, conditions: int = 0) -> int:
        """The estimated peak of one engine call (remembered: the queue asks often)."""
        key = (height, width, images, conditions)
        if key not in self._peaks:
            estimate = estimate_memory(
                self.root,
                self.plan.scheme,
                self.dtype,
                height=height,
                width=width,
                batch=images,
                conditions=conditions,
                parallel=self.plan.parallel,
                graph_buckets=self.plan.graph_buckets,
            )
            self._peaks[key] = estimate.peak(self.plan.residency)
        return self._peaks[key]

    def fits(self, height: int, width: int, images: int, conditions: int = 0) -> bool:
        return self.budget is None or self.peak(height, width, images, conditions) <= self.budget

    def check(self, height: int, width: int, images: int, conditions: int) -> str | None:
        """Why a request of ``images`` images at ``width`` x ``height`` with ``conditions``
        condition images per prompt cannot be held, naming the field and the limit; or None."""
        if self.fits(height, width, images, conditions):
            return None
        need = self.peak(height, width, images, conditions) / 1e9
        over = f"needs an estimated {need:.1f} GB, over this server's memory budget of {self.budget / 1e9:.1f} GB"
        if not self.fits(height, width, 1, 0):
            return (
                f"size = {width}x{height}: one image of this size {over}; allowed: at most "
                f"{self.max_side}x{self.max_side} pixels ({self.max_side**2} in all)"
            )
        if conditions and not self.fits(height, width, 1, conditions):
            most = max((c for c in range(conditions) if self.fits(height, width, 1, c)), default=0)
            return f"image: {conditions} condition images at {width}x{height} {over}; allowed: at most {most}"
        most = max((n for n in range(1, images) if self.fits(height, width, n, conditions)), default=1)
        return f"n = {images} at {width}x{height} {over}; allowed: n = 1..{most} at this size"

    def to_json(self) -> dict:
        return {
            "max_size": f"{self.max_side}x{self.max_side}",
            "images_per_call_at_max_size": self.batch,
            "condition_images_at_max_size": self.conditions,
            "peak_bytes": self.peak_bytes,
            "budget_bytes": self.budget,
            "lowered": self.lowered,
        }


def plan_admission(
    plan: MemoryPlan,
    root: str | Path,
    dtype: torch.dtype,
    *,
    max_side: int,
    min_side: int,
    multiple: int,
    batch: int,
    conditions: int,
) -> Admission:
    """What a server with ``plan`` (its scheme, residency and budget) holds, from the largest
    request it would otherwise take (``max_side`` square, ``batch`` images per call,
    ``conditions`` condition images per prompt). When that does not fit the budget: the largest
    side that holds one plain image, then at that side the most condition images and the most
    images per call that fit. No budget known: everything is admitted."""
    root = Path(root)

    def admission(side: int, b: int, c: int, lowered: str | None, peak: tuple) -> Admission:
        made = Admission(plan, root, dtype, side, b, c, 0, lowered)
        return Admission(plan, root, dtype, side, b, c, made.peak(*peak), lowered)

    asked = admission(max_side, batch, conditions, None, (max_side, max_side, batch, conditions))
    if asked.fits(max_side, max_side, batch, conditions):
        return asked
    sides = range(max_side, min_side - 1, -multiple)
    side = next((s for s in sides if asked.fits(s, s, 1)), min_side)
    c = next((c for c in range(conditions, -1, -1) if asked.fits(side, side, 1, c)), 0)
    b = next((b for b in range(batch, 0, -1) if asked.fits(side, side, b)), 1)
    need = asked.peak(max_side, max_side, batch, conditions)
    lowered = (
        f"the largest request it would take ({max_side}x{max_side}, {batch} images per call, "
        f"{conditions} condition images) needs an estimated {need / 1e9:.1f} GB under {plan.scheme} "
        f"{plan.residency}, over the budget of {plan.budget / 1e9:.1f} GB: it holds one image up to "
        f"{side}x{side}, and at that size {b} images per call or {c} condition images per prompt; "
        "larger requests get a 400 naming the limit"
    )
    if not asked.fits(side, side, 1):
        lowered += " (even the smallest image does not fit: expect out-of-memory errors)"
    return admission(side, b, c, lowered, (side, side, b, 0))  # b images or c conditions: the larger
