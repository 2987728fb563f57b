"""Adapters on a stage wherever it runs: what a call carries, and what the stage does with it.

A stage may run in this process, on rank processes (tensor parallel AR, CFG / Ulysses DiT), on
torchrun ranks or in a Ray replica; the pipeline only holds its handle. So an adapter reaches the
engine by value, never by a reference to a model object:

- a call (``ArCall`` / ``DitCall``) carries a ``StageLora``: the selection (one for every image,
  or one per image) and, for each adapter it names, the file or folder it is read from; the
  engine's side (``applied``) holds any adapter it does not hold yet, fitting it to its own
  weights (a rank's shard: ``apply.fit``), then applies the selection. A rank process that was
  replaced, or one that never saw a ``load``, reads the adapter at its first call that names it.
- ``hold_on`` / ``check_on`` / ``merge_on``: functions of an engine that a handle runs on every
  rank (``handle.run(functools.partial(...))``), so a bad adapter fails on the rank that cannot
  take it, before any image work, with the rank's message.

The update of each rank's shard is its part of the whole: a column shard applies its rows of
``B``, a row shard its columns of ``A``, and the all-reduce that sums the base's partial outputs
sums the adapter's too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from .apply import LoraSet, Selection, fit, merge
from .formats import LoraError, read_adapters

__all__ = ["StageLora", "applied", "check_on", "held", "hold_on", "merge_on"]


@dataclass(frozen=True)
class StageLora:
    """The adapters one stage call applies."""

    # (name, file or folder) of every adapter the selection names, sorted by name
    sources: tuple[tuple[str, str], ...]
    # ((name, scale), ...) for every image, or a list with one such tuple per image
    selection: Selection | list[Selection]


def _model(engine):
    model = getattr(engine, "model", None)
    if model is None:
        raise LoraError(f"lora: {type(engine).__name__} has no model to put an adapter on")
    return model


def _adapter(stage: str, source: str):
    adapters = read_adapters(source)
    if stage not in adapters:
        raise LoraError(f"lora {source}: holds no {stage.upper()} modules")
    return adapters[stage]


def hold(model, stage: str, name: str, source: str) -> LoraSet:
    """``model``'s adapters with ``name`` among them, read from ``source`` (and checked) if not
    held yet."""
    lset = LoraSet.of(model)
    if name not in lset.adapters:
        adapter = _adapter(stage, source)
        _fit_whole(model, adapter)
        lset.add(name, adapter)  # fits the shard
    return lset


def held(engine, stage: str, lora: StageLora) -> LoraSet:
    """The engine's adapters with every one ``lora`` names among them (read from its source on
    first use): what applies ``lora.selection``."""
    model = _model(engine)
    for name, source in lora.sources:
        hold(model, stage, name, source)
    return LoraSet.of(model)


@contextlib.contextmanager
def applied(engine, stage: str, lora: StageLora | None) -> Iterator[None]:
    """Within the block the engine's forwards apply ``lora`` (nothing without one)."""
    if lora is None:
        yield
        return
    with held(engine, stage, lora).selected(lora.selection):
        yield


def _fit_whole(model, adapter) -> None:
    """On a tensor-parallel rank, raise ``LoraError`` unless ``adapter`` fits the whole model
    (built on ``meta``, no storage): a shard takes a slice of A or B, so only the whole model
    says whether the adapter's full shapes fit. Nothing to check on a model that is no shard."""
    shard = getattr(model, "shard", None)
    if shard is None or shard.size == 1:
        return
    from ..weights import build_on_meta

    fit(build_on_meta(lambda: type(model)(model.config)), adapter)


def check_on(stage: str, source: str, engine) -> None:
    """Raise ``LoraError`` unless the adapter at ``source`` fits this engine's weights: the whole
    model's shapes, and a rank's shard; holds nothing."""
    model, adapter = _model(engine), _adapter(stage, source)
    _fit_whole(model, adapter)
    fit(model, adapter)


def hold_on(stage: str, source: str, name: str, engine) -> None:
    """Hold the adapter at ``source`` as ``name`` on this engine (unmerged; shapes checked)."""
    hold(_model(engine), stage, name, source)


def merge_on(stage: str, source: str, scale: float, engine) -> None:
    """Merge the adapter at ``source`` into this engine's weights for good (a rank: its shard);
    the caller has run ``check_on`` on every rank of both stages first (``LoraRegistry.merge``)."""
    model = _model(engine)
    merge(model, fit(model, _adapter(stage, source)), scale)
