"""The CPU int8 linear (issue 30): a row's output does not depend on how many rows share the call,
float32 activations keep float32 maths (so tensor-parallel shards add up like one process), and
no path is torch._int_mm, which is 240x slower than float32 on an AVX2 CPU."""

from __future__ import annotations

import pytest
import torch

from glm_image.ops.quant import TORCH_PATHS
from glm_image.ops.torch_ops import TorchOps
from glm_image.quant.formats import quantize


def _case(dtype):
    g = torch.Generator().manual_seed(0)
    weight = quantize(torch.randn(96, 256, generator=g), "int8")
    x = torch.randn(100, 256, generator=g).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    return x, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("k", [1, 3, 7, 16, 33, 100])
def test_a_rows_int8_output_does_not_depend_on_the_row_count(dtype, k):
    ops = TorchOps("cpu")
    x, weight, bias = _case(dtype)
    whole = ops.quant_linear(x, weight, bias)
    assert torch.equal(ops.quant_linear(x[:k], weight, bias), whole[:k])


def _path(x, weight) -> str:
    return next(p.name for p in TORCH_PATHS if "int8" in p.kinds and p.unfit(x, weight) is None)


@pytest.mark.parametrize("rows", [1, 16, 17, 600])
def test_float32_activations_keep_float32_maths(rows):
    x, weight, _ = _case(torch.float32)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1))
    assert _path(x, weight) == "int8-float"
    got = TorchOps("cpu").quant_linear(x, weight)
    exact = x.double() @ weight.dequantize(torch.float64).T
    assert float((got.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


def test_16_bit_activations_take_the_same_path_at_every_row_count():
    x, weight, _ = _case(torch.bfloat16)
    assert {_path(x[:k], weight) for k in (1, 16, 17, 100)} == {"int8-float"}


PROMPTS = ["a red fox in snow", "一只猫坐在窗台上", "a lighthouse at dusk, oil painting"]


@pytest.fixture(scope="module")
def int8_ar(tiny_checkpoint):
    from glm_image.engine import ArEngine

    return ArEngine.from_pretrained(tiny_checkpoint, quantize="int8")


def test_greedy_int8_jacobi_at_batch_3_window_8_writes_the_sequential_tokens(int8_ar):
    """Issue 24's case: a Jacobi forward computes 3 x 8 rows where sequential decoding computes 3,
    so int8 numerics that depended on the row count (bfloat16 ``int8pack`` up to 16 rows, another
    split above) wrote other tokens at 384x512. Greedy decoding is deterministic: any difference
    is a row that computed differently among others. With the paths in their old order
    (``int8pack`` first) 994 of the 1278 tokens differ. (On random weights greedy Jacobi accepts
    one token per forward, but each forward still computes its 8-row windows.)"""
    sequential = int8_ar.generate(PROMPTS, 384, 512, greedy=True)
    jacobi = int8_ar.generate(PROMPTS, 384, 512, greedy=True, decoding="jacobi", jacobi_window=8)
    assert jacobi.stats.decoding == "jacobi" and jacobi.stats.accepted is not None
    assert torch.equal(jacobi.tokens, sequential.tokens)
