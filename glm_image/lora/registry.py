"""The adapters of a pipeline's two stages, by name, and what one call applies.

A name stands for one adapter file or folder, which may hold an AR part, a DiT part or both;
a call's selection ((name, scale), ...) becomes one ``StageLora`` per stage with the names that
stage holds (``for_stages``), which the stage applies wherever it runs (``stage``). ``fixed``:
applied to every call (``from_pretrained``'s adapters when they are not merged); a call's own
selection comes on top.

The registry talks to the stages only through their handles (``handle.run`` of a function of
the engine), so the same code serves a stage in this process, on rank processes, on torchrun
ranks and in a Ray replica.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

from .formats import LoraError, read_adapters
from .stage import StageLora, check_on, hold_on, merge_on

__all__ = ["LoraRegistry"]


class LoraRegistry:
    def __init__(self, handles: Mapping[str, object]) -> None:
        self.handles = dict(handles)  # stage -> its handle (``stages.StageHandle``)
        self.sources: dict[str, str] = {}  # name -> the file or folder it was read from
        self.stages: dict[str, tuple[str, ...]] = {}  # name -> the stages it has a part for
        self.ranks: dict[str, list[int]] = {}  # name -> the LoRA ranks of its modules
        self.fixed: tuple[tuple[str, float], ...] = ()
        self.merged: list[tuple[str, float]] = []

    def _checked_then(self, path: str | Path, action, *args) -> tuple[str, dict]:
        """Read ``path``, check it on every rank of each stage it has a part for, and only then
        run ``action(stage, source, *args, engine)`` there; (the source, its adapters)."""
        source = str(Path(path).expanduser())
        adapters = read_adapters(source)
        for function, extra in ((check_on, ()), (action, args)):
            for stage in adapters:
                self.handles[stage].run(functools.partial(function, stage, source, *extra))
        return source, adapters

    def load(self, name: str, path: str | Path) -> None:
        """Read ``path`` and hold it as ``name`` (unmerged). Every shape is checked on every
        rank of both stages before either holds it."""
        if name in self.sources:
            raise LoraError(f"lora name {name!r} is already loaded (from {self.sources[name]})")
        source, adapters = self._checked_then(path, hold_on, name)
        self.sources[name] = source
        self.stages[name] = tuple(adapters)
        self.ranks[name] = sorted({u.rank for a in adapters.values() for u in a.modules.values()})

    def merge(self, path: str | Path, scale: float) -> None:
        """Merge ``path`` into the stages' weights (``W += scale * B @ A``) for good."""
        self._checked_then(path, merge_on, scale)
        self.merged.append((str(path), scale))

    def resolve(self, lora: Sequence[tuple[str, float]] | None) -> tuple[tuple[str, float], ...]:
        """A call's ``[(name or path, scale), ...]`` -> a selection of held names: a path not
        held yet is read now (and kept, named by its resolved path)."""
        selection = []
        for entry in lora or ():
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise LoraError(f"lora entry {entry!r}: expected (name or path, scale)")
            key, scale = entry
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
                raise LoraError(f"lora scale {scale!r} of {key!r}: must be a finite number")
            if str(key) not in self.sources:
                path = Path(key).expanduser()
                if not path.exists():
                    known = ", ".join(sorted(self.sources)) or "none loaded"
                    raise LoraError(f"lora {key!r}: neither a loaded adapter ({known}) nor a file or folder")
                key = str(path.resolve())
                if key not in self.sources:
                    self.load(key, path)
            selection.append((str(key), float(scale)))
        return tuple(selection)

    def describe(self) -> list[dict]:
        """What ``/health`` and logs show: each held adapter, its stages and ranks."""
        return [
            {"name": name, "source": source, "stages": list(self.stages[name]), "ranks": self.ranks[name]}
            for name, source in self.sources.items()
        ]

    def for_requests(self, requests) -> dict[str, StageLora | None]:
        """``for_stages`` of one call over ``requests`` (each with ``lora`` and ``num_images``):
        one selection for all when they agree, else one per image, request by request."""
        chosen = {r.lora: self.resolve(r.lora) for r in requests}  # every name checked now
        selection = chosen[requests[0].lora]
        if len(chosen) > 1:
            selection = [chosen[r.lora] for r in requests for _ in range(r.num_images)]
        return self.for_stages(selection)

    def for_stages(self, selection) -> dict[str, StageLora | None]:
        """Per stage, what a call applies: ``fixed`` + ``selection`` (one for every image, or a
        ``list`` with one per image), each row narrowed to the names that stage holds; None
        where the stage applies nothing."""
        per_image = isinstance(selection, list)
        rows = (
            [self.fixed + tuple(row) for row in selection] if per_image else [self.fixed + tuple(selection)]
        )
        out: dict[str, StageLora | None] = {}
        for stage in self.handles:
            mine = [tuple((n, s) for n, s in row if stage in self.stages.get(n, ())) for row in rows]
            names = sorted({n for row in mine for n, _ in row})
            if not names:
                out[stage] = None
                continue
            out[stage] = StageLora(tuple((n, self.sources[n]) for n in names), mine if per_image else mine[0])
        return out
