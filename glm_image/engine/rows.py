"""Batch-invariant rows: several decode rows in ONE forward, each bit for bit its solo forward.

A GEMM over n rows rounds a row differently than a GEMM over that row alone: BLAS libraries pick
their kernel and the order of a dot product's sums by the shape (on this CPU's MKL, one row takes
a GEMV path, and 4 rows another blocking than 3). So the AR scheduler's batched rows
(``engine.row_pool``) would write other tokens than their solo runs now and then. This module
makes the batched forward exact where the solo forward is one row at a time:

- every linear of the decoder, and the head, runs as ONE batched product of n one-row products
  (``torch.bmm`` of (n, 1, K) by the weight, stride 0 over the rows): the library runs the very
  one-row product of the solo call for each row, in one call. Whether it does is a property of
  the library on this device, so it is checked (``check_rows``) on the model's own weights before
  it is used: one row alone against rows together; where it fails, the rows run apart;
- attention runs per row over its own visible slots, bounded by its own position (the solo
  call's ``decode_attention`` with the solo ``length``), so no row's sums see another row's
  padding;
- the norms, rotary, the MLP's activation and the residual adds are per-element or per-row
  reductions whose order does not depend on the number of rows.

What is batched is everything but the attention: a decode step over n rows is one pass through
the layers with one call per linear, instead of n passes. On a CPU, where the tiny and small
models spend their step in per-call overhead, that is most of the step (see
``benchmarks/bench_continuous.py``).

``rows_twin(model)`` is the model with these linears and ops: a second module tree over the same
parameters (no weight is copied), for the scheduler's pool.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..quant.linear import QuantLinear

__all__ = ["RowsLinear", "RowsOps", "check_rows", "rows_twin"]


class RowsLinear(nn.Module):
    """``linear(x)`` for x (..., K) of n rows, each row computed as its own one-row product.

    A float ``nn.Linear``: one ``bmm`` over the rows (its weight expanded, not copied); any other
    linear (``QuantLinear``): a loop over the rows. One row is the wrapped call itself."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.batched = type(linear) is nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, 1, k)
        n = rows.shape[0]
        if n == 1:
            return self.linear(x)
        if not self.batched:
            out = torch.cat([self.linear(rows[i : i + 1]) for i in range(n)])  # (1, 1, K): the solo shape
            return out.reshape(*lead, out.shape[-1])
        weight, bias = self.linear.weight, self.linear.bias
        w = weight.t().expand(n, k, weight.shape[0])
        if bias is None:
            out = torch.bmm(rows, w)
        else:
            out = torch.baddbmm(bias.expand(n, 1, weight.shape[0]), rows, w)
        return out.reshape(*lead, weight.shape[0])


class RowsOps:
    """An ops backend whose window attention of one token per row is each row's own decode
    attention (its visible slots below its own position + 1, as its solo step bounds them);
    everything else is the wrapped backend's."""

    def __init__(self, ops) -> None:
        self._ops = ops

    def __getattr__(self, name: str):
        return getattr(self._ops, name)

    def window_attention(self, q, keys, values, visible, query_slots, *, scale: float, length=None):
        if q.shape[2] != 1:  # a real window (Jacobi rows): not what the pool runs
            return self._ops.window_attention(
                q, keys, values, visible, query_slots, scale=scale, length=length
            )
        ends = (query_slots[:, 0] + 1).tolist()
        return torch.cat(
            [
                self._ops.decode_attention(
                    q[i : i + 1],
                    keys[i : i + 1],
                    values[i : i + 1],
                    visible[i : i + 1],
                    scale=scale,
                    length=end,
                )
                for i, end in enumerate(ends)
            ]
        )


def _twin(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.Linear, QuantLinear)):
        return RowsLinear(module)
    twin = copy.copy(module)  # the same parameters and buffers; its own children
    twin._modules = {name: _twin(child) for name, child in module._modules.items()}
    return twin


def rows_twin(model: nn.Module) -> nn.Module:
    """``model`` (an ``ArModel``) over the same parameters, its linears ``RowsLinear`` and its ops
    ``RowsOps``: one forward of rows at their own positions (``slots`` (n, 1)) gives each row the
    bits of its solo decode step. It shares the model's modules as they are now: build it again
    after modules are replaced (an adapter wrapped in, weights quantized); weights changed in place
    are seen."""
    twin = _twin(model)
    twin.ops = RowsOps(model.ops)
    return twin


@torch.inference_mode()
def check_rows(twin: nn.Module, rows: int = 3) -> str | None:
    """None if every linear of ``twin`` gives each of ``rows`` rows the bits of that row alone
    (random inputs, the model's own weights, device and dtype); else why not, naming the linear.
    The attention needs no check: it is the solo call, row by row."""
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for name, module in twin.named_modules():
        if not isinstance(module, RowsLinear):
            continue
        weight = getattr(module.linear, "weight", None)
        if weight is None or not module.batched:
            continue  # the loop over rows is the solo call itself
        key = (tuple(weight.shape), weight.stride(), weight.dtype, module.linear.bias is not None)
        if key in seen:
            continue
        seen.add(key)
        k = weight.shape[1]
        x = torch.randn(rows, 1, k, generator=generator).to(weight.device, weight.dtype)
        together = module(x)
        for i in range(rows):
            if not torch.equal(together[i : i + 1], module.linear(x[i : i + 1])):
                return f"{name}: a product over {rows} rows differs from one row's in the last bits"
    return None
