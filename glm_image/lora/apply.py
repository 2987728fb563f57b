"""Putting adapters onto our models: merged into the weights, or beside them per request.

An adapter names the reference's modules (``q_proj``, ``to_q``, ...); our models fuse some of
them (q/k/v into one GEMM) and, under tensor parallelism, hold a shard. The model's own
``checkpoint_key_map`` says where each checkpoint tensor lands, so it also says where each
module's update lands: a fused linear's update is the per-part updates stacked along its
output rows (``B`` block-diagonal over the parts, ``A`` the parts' A stacked), a column shard
(``Part`` along dim 0) takes its rows of ``B``, a row shard (dim 1) its columns of ``A``, whose
partial products the model's all-reduce adds up like the base's.

- merged (``merge``): ``W += scale * B @ A`` once; nothing per token. Full-precision linears only.
- unmerged (``LoraSet``): a forward hook on each targeted linear adds ``scale * (x A^T) B^T`` to
  its output for the rows that chose the adapter; works on any base linear (``nn.Linear``,
  ``quant.QuantLinear``). Rows that chose none keep the base's output untouched, bit for bit.
  Rows that chose different adapters are computed group by group (gather, two small GEMMs,
  add back: what Punica's and S-LoRA's kernels do in one launch), so a row's update never mixes
  with another's.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..weights import Fuse, Part
from .formats import Adapter, LoraError, ModuleLora

__all__ = ["LoraSet", "Selection", "fit", "merge", "narrowed"]

# per row: the (adapter name, scale) pairs it applies; one entry for all rows, or one per row
Selection = tuple[tuple[str, float], ...]
_SETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its LoraSet


@contextlib.contextmanager
def narrowed(model: nn.Module, rows: Sequence[int]) -> Iterator[None]:
    """Within the block, a per-image selection on ``model`` covers only images ``rows`` (an
    engine running a call's images apart says which one runs). Nothing to do without one."""
    lset = _SETS.get(model)
    if lset is None or not isinstance(lset.selection, list):
        yield
        return
    before = lset.selection
    lset.selection = [before[r] for r in rows]
    try:
        yield
    finally:
        lset.selection = before


@dataclass(frozen=True)
class _Landing:
    """Where one checkpoint linear's update lands in one of our linears."""

    linear: str  # our module name
    rows: tuple[int, int]  # the rows [start, stop) of our output it fills
    b_rows: tuple[int, int] | None  # a column shard: the rows of the adapter's B it takes
    a_cols: tuple[int, int] | None  # a row shard: the columns of the adapter's A it takes


def _fused_rows(model: nn.Module, linear: str, sources: Sequence[str | Part], out: int) -> list[int]:
    """The row count of each source of a fused linear (a ``Part`` says; plain names: the AR's
    q/k/v from its head counts, otherwise equal parts)."""
    shard = getattr(model, "shard", None)
    if all(isinstance(s, Part) for s in sources):
        return [s.stop - s.start for s in sources]
    if shard is not None and linear.endswith("qkv_proj") and len(sources) == 3:
        d = model.config.head_dim
        return [shard.heads * d, shard.kv * d, shard.kv * d]
    return [out // len(sources)] * len(sources)


class _PlainNames:
    """``model`` as the key map sees it with every linear's weight named ``<linear>.weight``:
    a quantized linear holds ``q`` / ``scale`` instead, which the key map does not know."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self._model, self._names = model, names

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)


def _landings(model: nn.Module) -> dict[str, list[_Landing]]:
    """Checkpoint module name -> where its update lands, for every linear weight of ``model``."""
    linears = {
        n: m for n, m in model.named_modules() if hasattr(m, "in_features") and hasattr(m, "out_features")
    }
    names = [n for n in model.state_dict() if n.rsplit(".", 1)[0] not in linears]
    names += [f"{linear}.weight" for linear in linears]
    landings: dict[str, list[_Landing]] = {}
    for ours, target in type(model).checkpoint_key_map(_PlainNames(model, names)).items():
        linear = ours.removesuffix(".weight")
        if not ours.endswith(".weight") or linear not in linears:
            continue
        sources = target.sources if isinstance(target, Fuse) else (target,)
        sizes = _fused_rows(model, linear, sources, linears[linear].out_features)
        start = 0
        for source, size in zip(sources, sizes, strict=True):
            name = source.name if isinstance(source, Part) else source
            b_rows = a_cols = None
            if isinstance(source, Part):
                if source.dim == 0:
                    b_rows = (source.start, source.stop)
                else:
                    a_cols = (source.start, source.stop)
                    size = linears[linear].out_features
            landings.setdefault(name.removesuffix(".weight"), []).append(
                _Landing(linear, (start, start + size), b_rows, a_cols)
            )
            start += size
    return landings


def fit(model: nn.Module, adapter: Adapter) -> dict[str, ModuleLora]:
    """``adapter`` on ``model``'s linears: our linear's name -> its update, every shape checked.
    Raises ``LoraError`` naming the modules the model lacks or the shapes that do not fit."""
    landings = _landings(model)
    base = f" (its base_model_name_or_path: {adapter.base_model})" if adapter.base_model else ""
    missing = sorted(set(adapter.modules) - set(landings))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoraError(
            f"lora {adapter.source}: targets modules this {adapter.stage.upper()} model lacks: {shown}; "
            f"an adapter for another base model{base}? (it may target linears of the "
            f"{adapter.stage.upper()}'s attention and MLP / feed-forward)"
        )
    modules = {n: m for n, m in model.named_modules()}
    parts: dict[str, list[tuple[_Landing, ModuleLora]]] = {}
    for name, update in adapter.modules.items():
        for landing in landings[name]:
            linear = modules[landing.linear]
            a, b = update.a, update.b
            want_in = linear.in_features if landing.a_cols is None else landing.a_cols[1]
            want_out = landing.rows[1] - landing.rows[0] if landing.b_rows is None else landing.b_rows[1]
            ok_in = a.shape[1] == want_in if landing.a_cols is None else a.shape[1] >= want_in
            ok_out = b.shape[0] == want_out if landing.b_rows is None else b.shape[0] >= want_out
            if not (ok_in and ok_out):
                raise LoraError(
                    f"lora {adapter.source}: module {name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not "
                    f"fit its weight ({want_out} x {want_in}): an adapter for another base model{base}"
                )
            if landing.a_cols is not None:
                a = a[:, landing.a_cols[0] : landing.a_cols[1]]
            if landing.b_rows is not None:
                b = b[landing.b_rows[0] : landing.b_rows[1]]
            parts.setdefault(landing.linear, []).append((landing, ModuleLora(a, b)))
    fitted = {}
    for linear, pieces in parts.items():
        a = torch.cat([p.a for _, p in pieces])  # (sum r, in)
        b = torch.zeros(modules[linear].out_features, a.shape[0])  # block-diagonal over the parts
        col = 0
        for landing, piece in pieces:
            b[landing.rows[0] : landing.rows[1], col : col + piece.rank] = piece.b
            col += piece.rank
        fitted[linear] = ModuleLora(a.contiguous(), b)
    return fitted


@torch.no_grad()
def merge(model: nn.Module, fitted: dict[str, ModuleLora], scale: float) -> None:
    """``W += scale * B @ A`` for every fitted linear (computed in float32). Scale 0 changes
    nothing. Full-precision weights only: a quantized linear cannot take a dense update."""
    if scale == 0:
        return
    modules = dict(model.named_modules())
    for name, update in fitted.items():
        weight = getattr(modules[name], "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise LoraError(
                f"lora merged into {name}: its weight is quantized ({type(modules[name]).__name__}); "
                f"use the unmerged mode (lora_mode='unmerged') on a quantized model"
            )
        delta = scale * (update.b @ update.a)
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


class LoraSet:
    """Unmerged adapters on one model: a hook per targeted linear, and which adapters the next
    forwards apply (``selected``). Holds adapters by name; ``add`` more at any time."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, dict[str, ModuleLora]] = {}
        self.selection: Selection | list[Selection] = ()
        self._modules = dict(model.named_modules())
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._cast: dict[tuple[str, str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        # row indices per (group, device), made on first use: the prefill (eager) makes the decode
        # step's, so a device graph captured later copies nothing from the host
        self._index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        _SETS[model] = self

    @classmethod
    def of(cls, model: nn.Module) -> LoraSet:
        """The model's ``LoraSet``, made on first use (one per model: its hooks are the model's)."""
        found = _SETS.get(model)
        return found if found is not None else cls(model)

    def add(self, name: str, adapter: Adapter) -> None:
        """Fit ``adapter`` to the model (shapes checked) and keep it as ``name``."""
        fitted = fit(self.model, adapter)
        self.adapters[name] = fitted
        for linear in fitted:
            if linear not in self._hooks:
                self._hooks[linear] = self._modules[linear].register_forward_hook(self._hook(linear))

    def remove(self) -> None:
        """Take every hook off the model."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    def check(self, selection: Selection | list[Selection]) -> None:
        rows = selection if isinstance(selection, list) else [selection]
        for row in rows:
            for name, scale in row:
                if name not in self.adapters:
                    known = ", ".join(sorted(self.adapters)) or "none loaded"
                    raise LoraError(f"lora name {name!r} is not loaded; allowed: {known}")
                if not isinstance(scale, (int, float)) or scale != scale:
                    raise LoraError(f"lora scale {scale!r} of {name!r}: must be a number")

    @contextlib.contextmanager
    def selected(self, selection: Selection | list[Selection]) -> Iterator[None]:
        """Within the block, forwards apply ``selection``: ((name, scale), ...) for every row,
        or a ``list`` with one such tuple per image (images may differ; () = the base). A forward
        over as many rows as images maps row i to image i; over twice as many (classifier-free
        guidance: the conditional rows, then the unconditional ones), row i to image i mod n."""
        self.check(selection)
        before = self.selection
        if isinstance(selection, list):
            rows = [tuple(row) for row in selection]
            selection = rows[0] if len(set(rows)) == 1 else rows  # all alike: one for every row
        self.selection = selection
        try:
            yield
        finally:
            self.selection = before

    def _weights(self, adapter: str, linear: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (adapter, linear, like.device, like.dtype)
        if key not in self._cast:
            update = self.adapters[adapter][linear]
            self._cast[key] = (update.a.to(like.device, like.dtype), update.b.to(like.device, like.dtype))
        return self._cast[key]

    def _delta(self, linear: str, x: torch.Tensor, row: Selection) -> torch.Tensor | None:
        delta = None
        for name, scale in row:
            if scale == 0 or linear not in self.adapters[name]:
                continue
            a, b = self._weights(name, linear, x)
            term = nn.functional.linear(nn.functional.linear(x, a), b) * scale
            delta = term if delta is None else delta + term
        return delta

    def _hook(self, linear: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            selection = self.selection
            if not selection:
                return output
            x = args[0]
            if not isinstance(selection, list):  # one choice for every row
                delta = self._delta(linear, x, selection)
                return output if delta is None else output + delta
            images, rows = len(selection), x.shape[0]
            if rows not in (images, 2 * images):
                raise LoraError(
                    f"lora: a selection for {images} images cannot serve a forward over {rows} rows "
                    f"(allowed: {images}, or {2 * images} with classifier-free guidance)"
                )
            groups: dict[Selection, list[int]] = {}
            for row in range(rows):
                choice = selection[row % images]
                if choice:
                    groups.setdefault(tuple(choice), []).append(row)
            output = output.clone()
            for choice, rows in groups.items():
                key = (tuple(rows), x.device)
                if key not in self._index:
                    self._index[key] = torch.tensor(rows, device=x.device)
                index = self._index[key]
                delta = self._delta(linear, x.index_select(0, index), choice)
                if delta is not None:
                    output.index_add_(0, index, delta)
            return output

        return hook
