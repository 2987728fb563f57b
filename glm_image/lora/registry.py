"""The adapters of a pipeline's two stages, by name, and what one call applies.

A name stands for one adapter file or folder, which may hold an AR part, a DiT part or both;
a call's selection ((name, scale), ...) is handed to each stage's ``LoraSet`` with the names
that stage holds. ``fixed``: applied to every call (``from_pretrained``'s adapters when they
are not merged); a call's own selection comes on top.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn

from .apply import LoraSet, Selection, fit, merge
from .formats import Adapter, LoraError, read_adapters

__all__ = ["LoraRegistry"]


class LoraRegistry:
    def __init__(self, ar: nn.Module, dit: nn.Module) -> None:
        self.models = {"ar": ar, "dit": dit}
        self.sets = {"ar": LoraSet(ar), "dit": LoraSet(dit)}
        self.sources: dict[str, str] = {}  # name -> the file or folder it was read from
        self.fixed: Selection = ()
        self.merged: list[tuple[str, float]] = []

    @staticmethod
    def _read(path: str | Path) -> dict[str, Adapter]:
        return read_adapters(path)

    def load(self, name: str, path: str | Path) -> None:
        """Read ``path`` and hold it as ``name`` (unmerged). Every shape is checked first."""
        if name in self.sources:
            raise LoraError(f"lora name {name!r} is already loaded (from {self.sources[name]})")
        adapters = self._read(path)
        for stage, adapter in adapters.items():
            fit(self.models[stage], adapter)  # check both stages before holding either
        for stage, adapter in adapters.items():
            self.sets[stage].add(name, adapter)
        self.sources[name] = str(path)

    def merge(self, path: str | Path, scale: float) -> None:
        """Merge ``path`` into the stages' weights (``W += scale * B @ A``) for good."""
        adapters = self._read(path)
        fitted = {stage: fit(self.models[stage], adapter) for stage, adapter in adapters.items()}
        for stage, updates in fitted.items():
            merge(self.models[stage], updates, scale)
        self.merged.append((str(path), scale))

    def resolve(self, lora: Sequence[tuple[str, float]] | None) -> Selection:
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
        out = []
        for name, source in self.sources.items():
            stages = [s for s, lset in self.sets.items() if name in lset.adapters]
            ranks = sorted({u.a.shape[0] for s in stages for u in self.sets[s].adapters[name].values()})
            out.append({"name": name, "source": source, "stages": stages, "ranks": ranks})
        return out

    @contextlib.contextmanager
    def selected(self, selection: Selection | list[Selection]) -> Iterator[None]:
        """Within the block both stages apply ``fixed`` + ``selection`` (one for every image, or
        a ``list`` with one per image)."""
        per_image = isinstance(selection, list)
        rows = [tuple(self.fixed) + tuple(row) for row in selection] if per_image else None
        chosen = tuple(self.fixed) + tuple(() if per_image else selection)
        with contextlib.ExitStack() as stack:
            for lset in self.sets.values():
                if rows is not None:
                    mine = [tuple((n, s) for n, s in row if n in lset.adapters) for row in rows]
                    stack.enter_context(lset.selected(mine))
                else:
                    stack.enter_context(lset.selected(tuple((n, s) for n, s in chosen if n in lset.adapters)))
            yield
