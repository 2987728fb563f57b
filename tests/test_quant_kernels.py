"""The quantized matmuls of the ``triton`` and ``npu`` backends against the reference.

The Triton decode GEMM runs on CUDA when present, otherwise in Triton's interpreter on CPU tensors
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


# (kind, rows, out, cols, block_k, bias), 1-128 rows, odd output counts. int8: K not a multiple of
# the K block (one partial step at the default block, a partial third at 128). int4 (groups of
# 128, 64, 32 from ``default_group``): K a multiple of the group, not of the K block, so the last
# step holds fewer groups. From 17 rows on a call spans several row blocks of 16 (partial below 128).
GEMM_CASES = [
    ("int8", 1, 70, 200, None, True),
    ("int8", 33, 45, 328, 128, False),
    ("int8", 128, 33, 96, None, True),
    ("int4", 1, 70, 384, None, True),
    ("int4", 17, 48, 192, 128, True),
    ("int4", 100, 17, 96, 64, False),
]
ROW_COUNTS = (1, 2, 7, 16, 17, 33, 64, 100, 128)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("kind", "rows", "out", "cols", "block_k", "bias"), GEMM_CASES)
def test_the_gemm_kernel_equals_its_twin(kind, rows, out, cols, block_k, bias, dtype, poisoned):
    x, weight, b = _case(kind, rows, out, cols, dtype, seed=rows + out, bias=bias)
    got = gk.quant_linear(x, weight, b, block_k=block_k)
    _close(got, gk.quant_linear_reference(x, weight, b), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("kind", "cols"), [("int8", 320), ("int4", 384)])
def test_a_rows_result_does_not_depend_on_the_rows_computed_with_it(kind, cols, dtype, poisoned):
    """Row i's bits are the same alone, among the first M rows for every M, and among other rows
    in another order: the launch does not depend on M (K = 2 blocks of 256, the last partial, so
    a K block chosen by M would change the float32 sums; it makes this test fail)."""
    x, weight, b = _case(kind, 128, 20, cols, dtype, seed=5)
    whole = gk.quant_linear(x, weight, b)
    for m in ROW_COUNTS:
        assert torch.equal(gk.quant_linear(x[:m], weight, b), whole[:m]), f"first {m} rows"
    order = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gk.quant_linear(x[order], weight, b), whole[order])
    for i in (0, 15, 16, 99, 127):
        assert torch.equal(gk.quant_linear(x[i : i + 1], weight, b), whole[i : i + 1]), f"row {i} alone"


@needs_kernels
def test_the_gemm_reads_strided_activation_rows():
    x, weight, b = _case("int8", 4, 40, 128, torch.float32, 9)
    wide = torch.cat([x, x], dim=1)[:, :128]  # row stride 256
    _close(gk.quant_linear(wide, weight, b), gk.quant_linear_reference(x, weight, b), torch.float32)


@needs_kernels
def test_the_gemm_refuses_what_it_cannot_take():
    x, weight, b = _case("int8", 2, 40, 128, torch.float32, 3)
    with pytest.raises(ValueError, match="not fp8"):
        gk.quant_linear(x, quantize(torch.randn(40, 128), "fp8"))
    with pytest.raises(ValueError, match=r"x \(2, 64\) must be \(M, 128\)"):
        gk.quant_linear(x[:, :64], weight)
    with pytest.raises(ValueError, match="block_k = 24"):
        gk.quant_linear(x, weight, b, block_k=24)
    with pytest.raises(ValueError, match=r"bias \(39,\)"):
        gk.quant_linear(x, weight, b[:39])


@needs_kernels
def test_the_triton_backend_takes_decode_batches_and_leaves_the_rest(monkeypatch):
    from glm_image.ops.triton_ops import TritonOps

    ops = TritonOps(DEVICE)
    rows = {row.op: row.status for row in ops.verify_quant(torch.float32, "int4")}
    assert rows["quant_linear[int4] triton-gemv"] == "ok"
    calls = []
    real = gk.quant_linear
    monkeypatch.setattr(gk, "quant_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    assert gk.MAX_QUANT_ROWS == 128
    for rows in (1, 128, 129):
        x, weight, b = _case("int4", rows, 40, 128, torch.float32, rows)
        _close(ops.quant_linear(x, weight, b), gk.quant_linear_reference(x, weight, b), torch.float32)
    assert calls == [(1, 128), (128, 128)]  # 129 rows: a GEMM (the reference: dequantize + linear)


@needs_kernels
def test_the_gemv_benchmark_dry_run_writes_its_json(tmp_path):
    """``bench_quant.py gemv --dry-run`` (what gpu_run.sh's CPU dry run calls): the GPU benchmark's
    code at small widths, the kernel in the interpreter; every linear and row count is timed for
    dense bf16 and both formats, with a bandwidth share and the kernel's error against the twin."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quant.py"
    spec = importlib.util.spec_from_file_location("bench_quant", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gemv.json"
    bench.main(["gemv", "--dry-run", "--rows", "17", "--peak-tbps", "1e-4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["benchmark"] == "quant_gemv_gpu" and report["config"]["hbm_peak_tbps"] == 1e-4
    runs = {(r["linear"], r["rows"], r["format"], r["path"]): r for r in report["results"]}
    for linear in (*bench.DRY_LINEARS, "layer"):
        for kind, run in (("bf16", "dense"), ("int8", "triton"), ("int4", "triton")):
            r = runs[(linear, 17, kind, run)]
            assert r["us"] > 0 and r["hbm_fraction"] == pytest.approx(r["tb_per_s"] / 1e-4, rel=1e-3)
            assert linear == "layer" or r["max_rel_error"] < 2e-2  # bf16 activations
    assert any(n.startswith("17 rows, int4: default launch") for n in report["notes"])


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
