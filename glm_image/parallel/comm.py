"""One process group's collectives, as the models and engines call them.

A ``Comm`` wraps one ``torch.distributed`` group (the AR's tensor-parallel ranks, a DiT
sequence-parallel or CFG group) and offers the few collectives the models need. ``SINGLE`` is one
process: every collective is the identity, so single-device code calls the same methods and runs
the same maths it always did (no branch on "am I parallel" inside a model).

``CommStats`` counts the calls and bytes, and when ``timed`` adds the seconds each collective
took, the device synchronised before and after (benchmarks: the all-reduce / all-to-all share of
a stage). Timing synchronises, so a timed group's step cannot be captured in a device graph: the
AR then decodes eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..device import synchronize

__all__ = ["SINGLE", "Comm", "CommStats", "DitGroups"]


@dataclass
class CommStats:
    """Per collective kind (all_reduce, all_gather, all_to_all, broadcast): calls, bytes, seconds."""

    timed: bool = False
    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes), "seconds": dict(self.seconds)}


class Comm:
    """The collectives of one group of ``size`` ranks, this process being ``rank`` in it.

    ``group`` None with ``size`` 1 is one process (``SINGLE``). ``ranks``: the global ranks of
    the group, in group order (``src`` of a broadcast is a group rank)."""

    def __init__(
        self,
        group=None,
        size: int = 1,
        rank: int = 0,
        ranks: Sequence[int] = (0,),
        device: torch.device | None = None,
        stats: CommStats | None = None,
    ) -> None:
        self.group, self.size, self.rank, self.ranks = group, size, rank, tuple(ranks)
        self.device = device
        self.stats = stats if stats is not None else CommStats()

    @property
    def leads(self) -> bool:
        """True on the group's first rank: the one that decides, and the one that answers."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Comm(rank {self.rank} of {self.size}, global ranks {list(self.ranks)})"

    # ---------------------------------------------------------------- collectives

    def _timed(self, kind: str, x: torch.Tensor, run) -> None:
        """Run the collective ``run()``, counting it (and timing it when asked)."""
        if self.stats.timed:
            synchronize(x.device)
            start = time.perf_counter()
            run()
            synchronize(x.device)
            seconds = time.perf_counter() - start
        else:
            run()
            seconds = 0.0
        self.stats.add(kind, x.numel() * x.element_size(), seconds)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group, in place; returns ``x``."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        self._timed("all_reduce", x, lambda: dist.all_reduce(x, group=self.group))
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``, in group order (same shape on every rank)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))  # rank-major along dim 0
        self._timed("all_gather", out, lambda: _all_gather_into(out, x, self.group, dist))
        if dim in (0, -x.dim()):
            return out
        return torch.cat(out.chunk(self.size, dim=0), dim=dim)

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` of group rank ``src`` written into ``x`` on every rank, in place; returns ``x``."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        work = x if x.is_contiguous() else x.contiguous()
        self._timed("broadcast", work, lambda: dist.broadcast(work, self.ranks[src], group=self.group))
        if work is not x:
            x.copy_(work)
        return x

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Dim 0 of ``x`` (``size`` equal chunks) scattered: chunk ``j`` goes to rank ``j``; the
        result's chunk ``i`` is what rank ``i`` sent here."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        out = torch.empty_like(x)
        self._timed("all_to_all", x, lambda: dist.all_to_all_single(out, x, group=self.group))
        return out


def _all_gather_into(out: torch.Tensor, x: torch.Tensor, group, dist) -> None:
    # torch 2.13 renames all_gather_into_tensor (and warns); earlier releases have only it
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


SINGLE = Comm()


@dataclass(frozen=True)
class DitGroups:
    """The DiT's groups: ``cfg`` (2 ranks: the conditional and the unconditional branch, or one)
    and ``sp`` (the Ulysses ranks that share one branch). ``cfg`` x ``sp`` ranks in all."""

    cfg: Comm = SINGLE
    sp: Comm = SINGLE

    @property
    def leads(self) -> bool:
        """The rank that answers: the first of its CFG group and of its SP group."""
        return self.cfg.leads and self.sp.leads
