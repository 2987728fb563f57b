"""The quantized matmuls of the ``triton`` and ``npu`` backends against the reference.

The Triton GEMV runs on CUDA when present, otherwise in Triton's interpreter on CPU tensors
(conftest sets ``TRITON_INTERPRET=1``); its outputs are poisoned (``torch.empty`` fills NaN), so
a match proves every element was written. The ``npu`` path runs against the documented contract
of ``npu_weight_quant_batchmatmul`` (``fake_npu_quant``).
"""

from __future__ import annotations

import glm_image_kernels as gk
import pytest
import torch
from fake_npu_quant import make_quant_module
from fake_torch_npu import install

from glm_image.device import npu_module
from glm_image.ops.selfcheck import TOLERANCES
from glm_image.quant.formats import quantize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(
    not gk.HAVE_TRITON or (DEVICE.type == "cpu" and not gk.interpreted()),
    reason="needs Triton (CUDA, or TRITON_INTERPRET=1 at import)",
)
DTYPES = list(TOLERANCES)
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _case(
    kind: str,
    rows: int,
    out: int,
    cols: int,
    dtype: torch.dtype,
    seed: int,
    *,
    bias: bool = True,
    device=DEVICE,
):
    g = torch.Generator().manual_seed(seed)
    weight = quantize((torch.randn(out, cols, generator=g) / cols**0.5).to(device), kind)
    x = torch.randn(rows, cols, generator=g).to(dtype).to(device)
    b = (torch.randn(out, generator=g) * 0.1).to(dtype).to(device) if bias else None
    return x, weight, b


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.fixture
def poisoned(monkeypatch):
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


# (kind, rows, out, cols, bias): int4 groups of 128, 64 and 32; odd output counts; 1-16 rows
GEMV_CASES = [
    ("int8", 1, 70, 256, True),
    ("int8", 16, 33, 200, False),  # K not a multiple of the K block
    ("int4", 1, 70, 256, True),
    ("int4", 5, 48, 192, True),
    ("int4", 3, 17, 96, False),
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("kind", "rows", "out", "cols", "bias"), GEMV_CASES)
def test_the_gemv_kernel_equals_its_twin(kind, rows, out, cols, bias, dtype, poisoned):
    x, weight, b = _case(kind, rows, out, cols, dtype, seed=rows + out)
    _close(gk.quant_linear(x, weight, b), gk.quant_linear_reference(x, weight, b), dtype)


@needs_kernels
def test_the_gemv_reads_a_strided_activation_row():
    x, weight, b = _case("int8", 4, 40, 128, torch.float32, 9)
    wide = torch.cat([x, x], dim=1)[:, :128]  # row stride 256
    _close(gk.quant_linear(wide, weight, b), gk.quant_linear_reference(x, weight, b), torch.float32)


@needs_kernels
def test_the_triton_backend_takes_decode_batches_and_leaves_the_rest(monkeypatch):
    from glm_image.ops.triton_ops import TritonOps

    ops = TritonOps(DEVICE)
    rows = {row.op: row.status for row in ops.verify_quant(torch.float32, "int4")}
    assert rows["quant_linear[int4] triton-gemv"] == "ok"
    calls = []
    real = gk.quant_linear
    monkeypatch.setattr(gk, "quant_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    for rows in (1, 16, 17):
        x, weight, b = _case("int4", rows, 40, 128, torch.float32, rows)
        _close(ops.quant_linear(x, weight, b), gk.quant_linear_reference(x, weight, b), torch.float32)
    assert calls == [(1, 128), (16, 128)]  # 17 rows: a GEMM (the reference: dequantize + linear)


# ---------------------------------------------------------------------- npu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_the_npu_int8_matmul_meets_its_documented_contract(monkeypatch, dtype):
    install(monkeypatch, make_quant_module())
    try:
        from glm_image.ops.npu_ops import NpuOps

        ops = NpuOps("cpu")
        rows = {row.op: row.status for row in ops.verify_quant(dtype, "int8")}
        assert rows["quant_linear[int8] npu-wqbmm"] == "ok"
        x, weight, b = _case("int8", 3, 40, 128, dtype, 1, device="cpu")
        calls = []
        module = npu_module()
        real = module.npu_weight_quant_batchmatmul
        module.npu_weight_quant_batchmatmul = lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)
        _close(ops.quant_linear(x, weight, b), gk.quant_linear_reference(x, weight, b), dtype)
        assert calls == [(128, 40)]  # the documented (K, N) weight: a transposed view of our rows
        # float32 activations are outside the documented dtypes: the op is not called
        ops.quant_linear(x.float(), weight, b.float())
        assert len(calls) == 1
    finally:
        npu_module.cache_clear()


def test_an_npu_without_the_op_runs_the_reference(monkeypatch):
    install(monkeypatch)  # the fake without npu_weight_quant_batchmatmul
    try:
        from glm_image.ops.npu_ops import WQBMM_PATH

        x, weight, _ = _case("int8", 1, 40, 128, torch.bfloat16, 2, device="cpu")
        assert WQBMM_PATH.unfit(x, weight) == "this torch_npu has no npu_weight_quant_batchmatmul"
    finally:
        npu_module.cache_clear()
