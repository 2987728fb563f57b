"""The self-check: a non-reference backend's ops against the reference, before they serve.

The ``triton`` kernels and the ``npu`` fused operators are compiled or dispatched for hardware
that the test suite does not have. So before a backend serves a (device, dtype) for the first
time, every op it replaces runs once on small random inputs at the model's head sizes, and its
result is compared with the reference (``TorchOps``, the kernels' twins) within ``TOLERANCES``,
the table the parity tests use, taken relative to each output's scale (see ``_compare``). An op
that raises (fails to compile or launch) or disagrees is switched off for the process: its later
calls run on the reference through ``Ops.fallback``, with the reason recorded, and one warning
names the op and the error. The verdict is kept per (backend, device, dtype) for the process,
so a second engine on the same device does not check again.

Entry points:

- ``ops.verify(dtype, sizes)`` (``Ops.verify``): what engines call once after loading, with
  ``CheckSizes.from_config(checkpoint_config)``; returns the rows.
- lazily: if nobody called it, the first call of a replaced op for a (device, dtype) runs the
  check (at the sizes ``verify`` was last given, else the released model's), so a backend built
  by hand is checked too. Not while a graph is captured: the check reads results on the host.
- ``format_check(rows)``: a report for the command line (op, status, max abs error and its
  bound, tolerance, error); ``registry.check_backend`` chooses a backend by name and checks it.
- ``verify_quant(ops, device, dtype, kind)`` (``Ops.verify_quant``): the same for the quantized
  matmuls of one weight format (``ops.quant``; every backend, ``sdpa`` included, since torch's own
  quantized matmuls take layouts we choose), against ``quant_linear_reference``, at decode and
  prefill row counts; rows named ``quant_linear[<format>] <path>``. Checked when an engine loads a
  quantized model, or lazily at the first call.

Status of a row: ``ok``; ``FAILED`` (raised or disagreed: switched off); ``fallback`` (the
backend's own limits send these inputs to the reference, so there was nothing to check).

Imports point one way inside ``ops``: ``registry`` -> the backends (``triton_ops``, ``npu_ops``)
-> ``torch_ops`` (``Ops``, ``TorchOps``) -> ``selfcheck`` -> ``quant``. So this module knows a
backend only by what it reads of it (``Backend``) and is handed the reference class
(``Ops.verify`` passes ``TorchOps``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

__all__ = [
    "TOLERANCES",
    "Backend",
    "CheckRow",
    "CheckSizes",
    "format_check",
    "verify",
    "verify_quant",
]

log = logging.getLogger("glm_image.ops")

# (atol, rtol) of a replaced op against the reference, per dtype: the table of the parity tests
# (tests/test_kernels.py, tests/test_ops_npu.py) and of the self-check. A fused op computes in
# float32 and rounds once on store, the reference rounds after several intermediate steps (as
# the reference model does), and Triton's interpreter rounds toward zero on store, so 16-bit
# results may differ by a few units in the last place: bf16 has 8 significant bits (2^-8 = 3.9e-3
# relative), fp16 11 (4.9e-4).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}

OK, FAILED, FALLBACK = "ok", "FAILED", "fallback"


@dataclass(frozen=True)
class CheckSizes:
    """The model sizes the check runs at; the defaults are the released GLM-Image's."""

    hidden: int = 4096  # AR hidden size (the rows RMSNorm normalises)
    heads: int = 32  # AR query heads
    kv_heads: int = 2
    head_dim: int = 128
    rotary_dim: int = 64  # channels of each AR head that M-RoPE rotates
    intermediate: int = 13696  # AR MLP width (SwiGLU's halves)
    dit_heads: int = 32
    dit_head_dim: int = 128

    @classmethod
    def from_config(cls, config: Any) -> CheckSizes:
        """From a ``glm_image.config.CheckpointConfig`` (its ``ar.text`` and ``dit``)."""
        ar, dit = config.ar.text, config.dit
        return cls(
            hidden=ar.hidden_size,
            heads=ar.num_attention_heads,
            kv_heads=ar.num_key_value_heads,
            head_dim=ar.head_dim,
            rotary_dim=ar.rotary_dim,
            intermediate=ar.intermediate_size,
            dit_heads=dit.num_attention_heads,
            dit_head_dim=dit.attention_head_dim,
        )


@dataclass(frozen=True)
class CheckRow:
    """One op of one (backend, device, dtype) check."""

    backend: str
    device: str
    dtype: str
    op: str
    status: str  # ok | FAILED | fallback
    max_abs_error: float | None  # of the op's worst call; None when it raised or fell back
    bound: float | None  # what that call was held to: atol + rtol * max|reference|
    tolerance: tuple[float, float]  # (atol, rtol) from TOLERANCES
    error: str = ""  # the exception, the disagreement, or the fallback's reason


class Backend(Protocol):
    """What the check reads and writes of a backend (``torch_ops.Ops``); the ops themselves are
    called by name (see ``_cases``)."""

    name: str
    quant_paths: tuple[Any, ...]  # ``ops.quant.QuantPath``s
    check_sizes: CheckSizes | None
    _probing: list[tuple[str, str]] | None
    _off: dict[tuple[torch.device, torch.dtype], dict[str, str]]
    _quant_off: dict[tuple[torch.device, torch.dtype, str], dict[str, str]]

    def __init__(self, device: torch.device | str = ...) -> None: ...


# ---------------------------------------------------------------------- the cases

Call = Callable[[Backend], Any]  # runs the op on a backend, returns its output tensor(s)


class _Inputs:
    """Seeded random inputs on the device (a private generator: no global seed is touched)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        self.device, self.dtype = device, dtype
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, scale: float = 1.0, shift: float = 0.0, dtype: torch.dtype | None = None):
        x = torch.randn(*shape, generator=self.generator) * scale + shift
        return x.to(device=self.device, dtype=dtype or self.dtype)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator).to(self.device)


def _norm_cases(s: CheckSizes, new: Callable[[int], _Inputs]) -> dict[str, list[Call]]:
    i = new(1)
    x, residual = i.randn(2, 3, s.hidden, scale=3.0), i.randn(2, 3, s.hidden, scale=4.0)
    weight, pre = i.randn(s.hidden, scale=0.5, shift=1.0), i.randn(s.hidden, scale=0.5, shift=1.0)
    gate_up = i.randn(2, 3, 2 * s.intermediate)
    return {
        "rms_norm": [lambda ops: ops.rms_norm(x, weight, 1e-5)],
        # the AR model's residual step always carries the sandwich norm's pre_weight
        "add_rms_norm": [lambda ops: ops.add_rms_norm(x, residual, weight, 1e-5, pre_weight=pre)],
        "swiglu": [lambda ops: ops.swiglu(gate_up)],
    }


def _ar_cases(s: CheckSizes, new: Callable[[int], _Inputs]) -> dict[str, list[Call]]:
    i = new(2)
    b, t, heads, kv, d, rot = 2, 3, s.heads, s.kv_heads, s.head_dim, s.rotary_dim
    qkv = i.randn(b, t, heads + 2 * kv, d)  # (B, T, heads, D): the fused projection's output
    angles = i.rand(b, t, rot // 2) * 20
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(i.dtype)
    signed_sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(i.dtype)

    def rotary(ops: Backend) -> torch.Tensor:
        x = qkv.clone()
        ops.rotary_(x[:, :, : heads + kv], cos, signed_sin)  # in place on a strided view
        return x

    # decode: one query per row (a strided view, as the model's) over a static cache of which
    # the slots past the bound and a few random ones are hidden; the bound as a host int and as
    # a device tensor (the CUDA graph's)
    capacity, bound = 64, 50
    q = i.randn(b, 1, heads + 2 * kv, d)[:, :, :heads].transpose(1, 2)  # (B, H, 1, D)
    keys, values = i.randn(b, kv, capacity, d), i.randn(b, kv, capacity, d)
    visible = i.rand(b, capacity) > 0.25
    visible[:, bound:] = False
    visible[:, bound - 1] = True
    length = torch.tensor([bound], dtype=torch.int32, device=i.device)
    # a Jacobi window: 2 queries per row (a strided view), the rows at their own slots below the bound
    wq = i.randn(b, 2, heads + 2 * kv, d)[:, :, :heads].transpose(1, 2)  # (B, H, 2, D)
    query_slots = torch.tensor([[bound - 2, bound - 1], [30, 31]], device=i.device)
    window_open = visible.clone()
    window_open[torch.arange(b, device=i.device)[:, None], query_slots] = True

    # prefill: causal over a left-padded batch, grouped-query heads
    p = i.randn(b, heads + 2 * kv, 7, d)
    pq, pk, pv = p[:, :heads], p[:, heads : heads + kv], p[:, heads + kv :]
    keep = torch.ones(b, 7, dtype=torch.bool, device=i.device)
    keep[1, :3] = False
    causal = torch.ones(7, 7, dtype=torch.bool, device=i.device).tril()
    mask = ((causal & keep[:, None, :]) | torch.eye(7, dtype=torch.bool, device=i.device))[:, None]
    return {
        "rotary_": [rotary],
        "decode_attention": [
            lambda ops: ops.decode_attention(q, keys, values, visible, scale=d**-0.5, length=bound),
            lambda ops: ops.decode_attention(q, keys, values, visible, scale=d**-0.5, length=length),
        ],
        "window_attention": [
            lambda ops: ops.window_attention(
                wq, keys, values, window_open, query_slots, scale=d**-0.5, length=bound
            ),
            lambda ops: ops.window_attention(
                wq, keys, values, window_open, query_slots, scale=d**-0.5, length=length
            ),
        ],
        "attention": [lambda ops: ops.attention(pq, pk, pv, mask=mask, scale=d**-0.5)],
    }


def _dit_cases(s: CheckSizes, new: Callable[[int], _Inputs]) -> dict[str, list[Call]]:
    i = new(3)
    b, text, image, heads, d = 2, 3, 6, s.dit_heads, s.dit_head_dim
    dim = heads * d
    x = i.randn(b, 5, dim, scale=2.0, shift=0.5)
    # scale and shift are chunks of the modulation GEMM output (B, 12 * dim), as in the model
    scale, shift = (m.unsqueeze(1) for m in i.randn(b, 12 * dim, scale=0.3).chunk(12, dim=1)[2:4])
    q, k, v = i.randn(b, text + image, 3, heads, d, scale=2.0, shift=0.3).unbind(2)  # (B, S, heads, D)
    angles = (i.rand(image, d // 2) * 30).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()  # float32 tables, as models.dit builds them
    joint = [t.transpose(1, 2) for t in (q, k, v)]  # (B, heads, S, D)
    return {
        "layer_norm_modulate": [lambda ops: ops.layer_norm_modulate(x, scale, shift, 1e-5)],
        "qk_norm_rope": [lambda ops: ops.qk_norm_rope(q, k, cos, sin, text, 1e-5)],
        "attention": [lambda ops: ops.attention(*joint, mask=None, scale=d**-0.5)],
    }


def _cases(sizes: CheckSizes, device: torch.device, dtype: torch.dtype) -> dict[str, list[Call]]:
    def new(seed: int) -> _Inputs:
        return _Inputs(device, dtype, seed)

    cases = {**_norm_cases(sizes, new), **_ar_cases(sizes, new)}
    for op, calls in _dit_cases(sizes, new).items():
        cases[op] = cases.get(op, []) + calls
    return cases


def _replaced_ops(ops: Backend, reference: type[Backend]) -> list[str]:
    """The ops ``ops``'s backend implements itself (the rest are the reference's)."""
    return [
        name
        for name in vars(reference)
        if not name.startswith("_")
        and callable(getattr(reference, name))
        and getattr(type(ops), name) is not getattr(reference, name)
    ]


# ---------------------------------------------------------------------- running it


def _tensors(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _compare(got: Any, want: Any, tolerance: tuple[float, float]) -> tuple[float, float, str]:
    """(max |got - want|, the bound it is held to, why they disagree or "") over the outputs.

    The bound is ``atol + rtol * max|want|`` per output: relative to the output's scale, not
    element by element, because sums that cancel (the residual add, attention's weighted
    values, AdaLN's shift, rotary's products) carry the rounding error of their terms, not of
    their result: element by element, a correct 16-bit kernel fails near the zeros. A broken
    kernel (garbage, NaN, a wrong layout or formula) is off by the order of the values."""
    atol, rtol = tolerance
    worst, worst_bound, why = 0.0, atol, ""
    for g, w in zip(_tensors(got), _tensors(want), strict=True):
        if g.shape != w.shape or g.dtype != w.dtype:
            return (
                float("inf"),
                atol,
                f"returned {g.dtype} {tuple(g.shape)}, expected {w.dtype} {tuple(w.shape)}",
            )
        if not g.numel():
            continue
        g, w = g.float(), w.float()
        error = float((g - w).abs().nan_to_num(float("inf")).max())  # NaN counts as infinitely off
        bound = atol + rtol * float(w.abs().max())
        if error / bound > worst / worst_bound:
            worst, worst_bound = error, bound
        if error > bound and not why:
            why = f"max |diff| {error:.3g} > {bound:.3g} = atol + rtol * max|reference|"
    return worst, worst_bound, why


def _check_op(
    probe: Backend, reference: Backend, op: str, calls: list[Call], tolerance: tuple[float, float]
) -> tuple[str, float | None, float | None, str]:
    """(status, max abs error, its bound, error text) of one op over its calls."""
    worst, worst_bound = 0.0, tolerance[0]
    for call in calls:
        want = call(reference)
        probe._probing.clear()
        try:
            got = call(probe)
        except Exception as e:  # a kernel that cannot compile or launch: any error switches it off
            return FAILED, None, None, f"{type(e).__name__}: {e}".strip()
        if probe._probing:
            return FALLBACK, None, None, probe._probing[0][1]
        error, bound, why = _compare(got, want, tolerance)
        if error / bound >= worst / worst_bound:
            worst, worst_bound = error, bound
        if why:
            return FAILED, error, bound, why
    return OK, worst, worst_bound, ""


def _run(
    ops: Backend, reference_cls: type[Backend], device: torch.device, dtype: torch.dtype, sizes: CheckSizes
) -> list[CheckRow]:
    ops_names = _replaced_ops(ops, reference_cls)
    if not ops_names:
        return []
    probe = type(ops)(device)  # a private instance: its fallbacks are the check's, not the engine's
    probe._probing = []
    reference = reference_cls(device)
    tolerance = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    where = str(device), str(dtype).removeprefix("torch.")
    rows = []
    with torch.inference_mode():
        cases = _cases(sizes, device, dtype)
        for op in ops_names:
            status, error, bound, text = _check_op(probe, reference, op, cases[op], tolerance)
            rows.append(CheckRow(ops.name, *where, op, status, error, bound, tolerance, text))
    return rows


# (backend, device, dtype) -> rows, for the process: each check runs once
_VERDICTS: dict[tuple[str, str, torch.dtype], tuple[CheckRow, ...]] = {}
_LOCK = threading.Lock()


def _device_key(device: torch.device) -> str:
    """``cuda`` and ``cuda:<current>`` are one device."""
    if device.index is None and device.type != "cpu":
        current = getattr(getattr(torch, device.type, None), "current_device", None)
        if callable(current):
            return f"{device.type}:{current()}"
    return str(device)


def verify(
    ops: Backend,
    reference: type[Backend],
    device: torch.device | str,
    dtype: torch.dtype,
    sizes: CheckSizes | None = None,
) -> list[CheckRow]:
    """``Ops.verify`` on ``device`` (see the module docstring): check once per process against
    ``reference`` (the class of the reference backend, ``TorchOps``), switch the failed ops off
    on ``ops``, return the rows."""
    device = torch.device(device)
    if sizes is not None:
        ops.check_sizes = sizes
    key = (ops.name, _device_key(device), dtype)
    with _LOCK:
        rows = _VERDICTS.get(key)
        if rows is None:
            rows = _VERDICTS[key] = tuple(
                _run(ops, reference, device, dtype, ops.check_sizes or CheckSizes())
            )
            for row in rows:
                if row.status == FAILED:
                    log.warning(
                        "%s backend on %s (%s): %s failed its self-check and is switched off for this "
                        "process (its calls run on sdpa): %s",
                        *(row.backend, row.device, row.dtype, row.op, row.error),
                    )
    ops._off[(device, dtype)] = {
        row.op: f"switched off by the self-check: {row.error}" for row in rows if row.status == FAILED
    }
    return list(rows)


# ---------------------------------------------------------------------- quantized matmuls

_QUANT_ROWS = (1, 3, 37)  # a decode step, a small batch, 3 row blocks of the decode GEMM (past int8pack's 16)
_QUANT_OUT = 96  # output channels of the check's weight (a multiple of 16, not of 64)
_COARSER = (torch.float32, torch.float16, torch.bfloat16)  # by increasing rounding error


def _quant_tolerance(dtype: torch.dtype, precision: torch.dtype | None) -> tuple[float, float]:
    """The tolerance of a path whose activations are computed in ``precision`` for inputs of ``dtype``."""
    from .quant import QUANTIZED_TOLERANCES

    if precision in QUANTIZED_TOLERANCES:  # quantized activations (W8A8)
        return QUANTIZED_TOLERANCES[precision]
    ranks = [_COARSER.index(d) if d in _COARSER else 0 for d in (dtype, precision or dtype)]
    return TOLERANCES[_COARSER[max(ranks)]]


def _run_quant(
    ops: Backend, device: torch.device, dtype: torch.dtype, kind: str, sizes: CheckSizes
) -> list[CheckRow]:
    from glm_image_kernels import MAX_QUANT_ROWS, quant_linear_reference

    from ..quant.formats import quantize

    inputs = _Inputs(device, dtype, 4)
    k = sizes.hidden
    weight = quantize(inputs.randn(_QUANT_OUT, k, scale=k**-0.5, dtype=torch.float32), kind)
    weight = replace(weight, w8a8=kind == "int8")  # the W8A8 path is checked too
    bias = inputs.randn(_QUANT_OUT, scale=0.1)
    # and a prefill past the decode GEMV's rows, where the W8A8 GEMMs serve
    xs = [inputs.randn(m, k) for m in (*_QUANT_ROWS, MAX_QUANT_ROWS + 21)]
    where = str(device), str(dtype).removeprefix("torch.")
    rows = []
    with torch.inference_mode():
        for path in ops.quant_paths:
            if kind not in path.kinds:
                continue
            op = f"quant_linear[{kind}] {path.name}"
            tolerance = _quant_tolerance(dtype, path.precision)
            status, worst, worst_bound, text, ran = OK, 0.0, tolerance[0], "", False
            for x in xs:
                if path.unfit(x, weight) is not None:
                    continue
                ran = True
                want = quant_linear_reference(x, weight, bias)
                try:
                    got = path.run(x, weight, bias)
                except Exception as e:  # a kernel that cannot compile or launch
                    status, worst, worst_bound, text = FAILED, None, None, f"{type(e).__name__}: {e}".strip()
                    break
                error, bound, why = _compare(got, want, tolerance)
                if error / bound >= worst / worst_bound:
                    worst, worst_bound = error, bound
                if why:
                    status, text = FAILED, f"{x.shape[0]} rows: {why}"
                    break
            if ran:
                rows.append(CheckRow(ops.name, *where, op, status, worst, worst_bound, tolerance, text))
    return rows


def verify_quant(
    ops: Backend, device: torch.device | str, dtype: torch.dtype, kind: str, sizes: CheckSizes | None = None
) -> list[CheckRow]:
    """``Ops.verify_quant`` on ``device`` (see the module docstring): check once per process,
    switch the failed paths off on ``ops``, return the rows."""
    device = torch.device(device)
    if sizes is not None:
        ops.check_sizes = sizes
    key = (f"{ops.name}:quant:{kind}", _device_key(device), dtype)
    with _LOCK:
        rows = _VERDICTS.get(key)
        if rows is None:
            rows = _VERDICTS[key] = tuple(
                _run_quant(ops, device, dtype, kind, ops.check_sizes or CheckSizes())
            )
            for row in rows:
                if row.status == FAILED:
                    log.warning(
                        "%s backend on %s (%s): %s failed its self-check and is switched off for this "
                        "process (its calls run on the reference): %s",
                        *(row.backend, row.device, row.dtype, row.op, row.error),
                    )
    ops._quant_off[(device, dtype, kind)] = {
        row.op.rsplit(" ", 1)[1]: f"switched off by the self-check: {row.error}"
        for row in rows
        if row.status == FAILED
    }
    return list(rows)


def format_check(rows: list[CheckRow]) -> str:
    """A table of the rows: op, status, max abs error and its bound (atol + rtol * max|reference|),
    the tolerance, the error."""
    if not rows:
        return "nothing to check: the sdpa backend is the reference"
    head = ("op", "status", "max abs error", "bound", "tolerance (atol, rtol)", "error")
    lines = [
        (
            row.op,
            row.status,
            "-" if row.max_abs_error is None else f"{row.max_abs_error:.2e}",
            "-" if row.bound is None else f"{row.bound:.2e}",
            f"{row.tolerance[0]:g}, {row.tolerance[1]:g}",
            row.error,
        )
        for row in rows
    ]
    widths = [max(len(x) for x in column) for column in zip(head, *lines, strict=True)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    first = rows[0]
    title = f"{first.backend} backend on {first.device} ({first.dtype}), against sdpa:"
    failed = sum(row.status == FAILED for row in rows)
    verdict = f"{failed} op(s) switched off" if failed else "every op passed or falls back by design"
    return "\n".join([title, line(head), line(["-" * w for w in widths]), *map(line, lines), verdict])
