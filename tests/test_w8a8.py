"""W8A8 linears (issue 24): per-token activation codes in one pass, the int8 ``_int_mm`` path and
the fp8 ``_scaled_mm`` path of ``glm_image.ops.quant``.

The kernels (``glm_image_kernels.act_quant``) run on CUDA when present, otherwise in Triton's
interpreter on CPU tensors; their outputs are compared with their twins bit for bit (codes and
scales). The paths' maths run on CPU tensors where there is no GPU (``torch._int_mm`` and
``torch._scaled_mm`` exist on the CPU; the int8 path's ``unfit`` keeps it for CUDA in service),
against an independent float64 computation of the same quantized product (numpy's rounding, not
ours) and against the weight-only reference within the self-check's tolerance. Each check is
shown to reject a wrong variant (a per-tensor scale, another row's scale).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import glm_image_kernels as gk
import numpy as np
import pytest
import torch

from glm_image.ops import quant
from glm_image.ops.selfcheck import _compare, _quant_tolerance
from glm_image.quant.formats import quantize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(
    not gk.HAVE_TRITON or (DEVICE.type == "cpu" and not gk.interpreted()),
    reason="needs Triton (CUDA, or TRITON_INTERPRET=1 at import)",
)
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["float32", "bfloat16", "float16"]
PATHS = {p.name: p for p in quant.TORCH_PATHS}
TINY = torch.finfo(torch.float32).tiny


def _bits(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes


def _rows(k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Six rows of ``k`` over six decades of magnitude, one all zero, one with -0.0 entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, k, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0
    x[4, ::3] = -0.0
    return x.to(DEVICE, dtype)


# ---------------------------------------------------------------------- the activation codes


@needs_kernels
@pytest.mark.parametrize("dtype", FLOATS, ids=IDS)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_activation_codes_equal_the_twin_bit_for_bit(kind, dtype):
    """Odd K, K over several blocks with a tail (``block`` 64: as K past ``MAX_BLOCK``), a zero
    row, padding rows: same codes, same scales."""
    for k, block in ((1, None), (7, None), (300, None), (300, 64)):
        x = _rows(k, dtype, seed=k)
        codes, scales = gk.quantize_rows(x, kind, rows=9, block=block)
        want_codes, want_scales = gk.quantize_rows_reference(x, kind, rows=9)
        assert codes.shape == (9, k) and scales.shape == (9,)
        assert torch.equal(_bits(codes), _bits(want_codes)), (kind, dtype, k)
        assert torch.equal(scales, want_scales), (kind, dtype, k)
        assert scales[2] == TINY and not _bits(codes[2]).any()  # a zero row: zeros, not NaN
        assert not _bits(codes[6:]).any() and bool((scales[6:] == 1).all())  # the padding


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_ties_round_to_even_on_every_code(kind):
    """Every code and every midpoint between neighbours (the ties), in a row whose maximum makes
    the scale exactly 1: the kernel rounds like torch's cast (e4m3) and ``torch.round`` (int8)."""
    if kind == "fp8":
        values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        values = values[torch.isfinite(values)].unique()  # also the subnormals, +-0
    else:
        values = torch.arange(-127.0, 128.0)
    mids = (values[1:] + values[:-1]) / 2
    row = torch.cat([values, mids, torch.tensor([-0.0, gk.act_quant.QMAX[kind]])])[None].to(DEVICE)
    codes, scales = gk.quantize_rows(row, kind)
    want_codes, want_scales = gk.quantize_rows_reference(row, kind)
    assert float(scales[0]) == 1.0 == float(want_scales[0])
    assert torch.equal(_bits(codes), _bits(want_codes))


@needs_kernels
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf / inf
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_a_non_finite_row_gets_a_non_finite_scale(kind):
    """inf or NaN in a row makes its scale non-finite (so its output row is too), as in the
    twin; the other rows are untouched."""
    x = _rows(40, torch.float32)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    codes, scales = gk.quantize_rows(x, kind)
    want_codes, want_scales = gk.quantize_rows_reference(x, kind)
    assert scales[0].isnan() and want_scales[0].isnan()
    assert scales[1].isinf() and want_scales[1].isinf()
    assert torch.equal(scales[2:], want_scales[2:])
    assert torch.equal(_bits(codes[2:]), _bits(want_codes[2:]))


@needs_kernels
@pytest.mark.parametrize("dtype", FLOATS, ids=IDS)
def test_the_int8_epilogue_equals_its_twin(dtype):
    """``acc * x_scale * w_scale + bias`` rounded once; acc a row slice of a padded product (a
    view). Within one unit in the last place of ``dtype``: Triton's interpreter rounds toward
    zero on store, the GPU may fuse a multiply-add."""
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-(2**20), 2**20, (45, 200), generator=g, dtype=torch.int32).to(DEVICE)
    x_scale, w_scale = (torch.rand(n, generator=g).to(DEVICE) * 1e-3 for n in (45, 200))
    bias = torch.randn(200, generator=g).to(DEVICE, dtype)
    for b in (None, bias):
        got = gk.scale_int32(acc[:40], x_scale, w_scale, b, dtype)
        product = acc[:40].double() * x_scale[:40, None].double() * w_scale.double()
        exact = product + (b.double() if b is not None else 0)
        assert got.dtype == dtype and got.shape == (40, 200)
        # one unit of dtype (its smallest normal number below it), the float32 maths' few roundings
        terms = product.abs() + (b.double().abs() if b is not None else 0)
        bound = torch.finfo(dtype).eps * exact.abs() + 2.0**-21 * terms + torch.finfo(dtype).tiny
        assert bool(((got.double() - exact).abs() <= bound).all())
        twin = gk.scale_int32_reference(acc[:40], x_scale, w_scale, b, dtype)
        assert bool(((got.double() - twin.double()).abs() <= bound).all())
        if dtype == torch.float32 and DEVICE.type == "cpu":  # the interpreter: the twin's very ops
            assert torch.equal(got, twin)


# ---------------------------------------------------------------------- the int8 path


def _case(rows: int, dtype: torch.dtype, k: int = 256, n: int = 96, seed: int = 2):
    """Rows over four decades of magnitude (a per-tensor scale would drown the small ones); a
    small bias, so that a row's error is measured against its own product."""
    g = torch.Generator().manual_seed(seed)
    weight = quantize((torch.randn(n, k, generator=g) * k**-0.5).to(DEVICE), "int8")
    weight = dataclasses.replace(weight, w8a8=True)  # a DiT linear's (the AR's stay weight-only)
    magnitude = torch.logspace(-2, 2, rows)[torch.randperm(rows, generator=g), None]
    x = torch.randn(rows, k, generator=g) * magnitude
    bias = torch.randn(n, generator=g) * 1e-3
    return x.to(DEVICE, dtype), weight, bias.to(DEVICE, dtype)


def _exact_w8a8(x: torch.Tensor, weight, bias: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The quantized product in float64 from codes numpy computes in float32 (the contract:
    scale = max(max|row| / 127, FLT_MIN), codes = rint(x / scale), ties to even); and the size
    of its terms (|product| + |bias|), which the float32 epilogue's rounding is relative to."""
    xn = x.float().cpu().numpy()
    s = np.maximum(np.abs(xn).max(axis=1) / np.float32(127), np.float32(TINY)).astype(np.float32)
    q = np.clip(np.rint(xn / s[:, None]), -127, 127)
    acc = q.astype(np.float64) @ weight.data.cpu().numpy().astype(np.float64).T
    product = acc * s[:, None].astype(np.float64) * weight.scale.cpu().numpy().astype(np.float64)
    b = bias.double().cpu().numpy()
    return product + b, np.abs(product) + np.abs(b)


def _tight(got: torch.Tensor, exact: np.ndarray, terms: np.ndarray) -> bool:
    """Within the output dtype's rounding plus the float32 epilogue's (a few float32 ulps)."""
    g = got.double().cpu().numpy()
    bound = np.abs(exact) * torch.finfo(got.dtype).eps + terms * 2.0**-21
    return bool((np.abs(g - exact) <= bound).all())


def _loose(got: torch.Tensor, reference: torch.Tensor) -> bool:
    """Against the weight-only reference, row by row: ``W8A8_TOLERANCE`` of the row's own scale."""
    atol, rtol = quant.W8A8_TOLERANCE
    error = (got.float() - reference.float()).abs().amax(dim=1)
    return bool((error <= atol + rtol * reference.float().abs().amax(dim=1)).all())


def _wrong(x, weight, bias, *, per_tensor: bool) -> torch.Tensor:
    """Wrong variants: one activation scale for the whole tensor, or each row given another
    row's scale (a layout slip)."""
    xf = x.float()
    if per_tensor:
        scale = (xf.abs().amax() / 127).clamp_min(TINY).expand(x.shape[0])
    else:
        scale = (xf.abs().amax(dim=1) / 127).clamp_min(TINY)
    codes = torch.round(xf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(codes, weight.data.t()).float()
    used = scale if per_tensor else scale.flip(0)
    return (acc * used[:, None] * weight.scale + bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_int8_path_is_the_quantized_product(dtype):
    """The path's output is the float64 product of its codes and scales up to the output's
    rounding (tight), and lands within ``W8A8_TOLERANCE`` of the weight-only reference, per row
    and as the self-check measures it. A per-tensor scale and another row's scale fail both."""
    x, weight, bias = _case(40, dtype)
    got = PATHS["int8-w8a8"].run(x, weight, bias)
    assert got.dtype == dtype and got.shape == (40, 96)
    exact, terms = _exact_w8a8(x, weight, bias)
    reference = gk.quant_linear_reference(x, weight, bias)
    assert _tight(got, exact, terms)
    assert _loose(got, reference)
    assert not _compare(got, reference, _quant_tolerance(dtype, torch.int8))[2]
    for per_tensor in (True, False):
        bad = _wrong(x, weight, bias, per_tensor=per_tensor)
        assert not _tight(bad, exact, terms) and not _loose(bad, reference), per_tensor
    codes, _ = gk.quantize_rows_reference(x, "int8")  # the twin's codes are numpy's
    xn = x.float().cpu().numpy()
    s = np.maximum(np.abs(xn).max(axis=1) / np.float32(127), np.float32(TINY)).astype(np.float32)
    assert np.array_equal(codes.cpu().numpy(), np.clip(np.rint(xn / s[:, None]), -127, 127))


def test_a_rows_int8_output_does_not_depend_on_the_other_rows():
    """Per-token scales and exact int32 sums: a row alone (padded with zero rows to 17) or among
    17, 40 or 300 rows, in any order, gets the same bits."""
    x, weight, bias = _case(300, torch.bfloat16, seed=3)
    run = PATHS["int8-w8a8"].run
    whole = run(x, weight, bias)
    for m in (17, 40):
        assert torch.equal(run(x[:m], weight, bias), whole[:m])
    for i in (0, 123, 299):
        assert torch.equal(run(x[i : i + 1], weight, bias), whole[i : i + 1])
    order = torch.randperm(300, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    assert torch.equal(run(x[order], weight, bias), whole[order])


def test_the_int8_path_serves_cuda_prefill_only():
    """Decoding (up to ``MAX_QUANT_ROWS`` rows) never takes W8A8, nor an AR linear (weight-only);
    a CPU takes int8-float."""
    path = PATHS["int8-w8a8"]
    assert path.precision == torch.int8
    assert _quant_tolerance(torch.bfloat16, torch.int8) == quant.W8A8_TOLERANCE
    x, weight, _ = _case(gk.MAX_QUANT_ROWS + 1, torch.float32)
    assert "weight-only" in path.unfit(x, dataclasses.replace(weight, w8a8=False))
    if DEVICE.type == "cpu":
        assert "a CUDA path" in path.unfit(x, weight)
    else:
        assert path.unfit(x, weight) is None
        assert "rows or fewer" in path.unfit(x[: gk.MAX_QUANT_ROWS], weight)


# ---------------------------------------------------------------------- the fp8 path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_fp8_path_is_the_quantized_product(dtype):
    """``_scaled_mm`` over the per-token e4m3 codes (torch's own cast here: independent of the
    kernel's rounding) against the float64 product, within its bfloat16 output's rounding (and
    the bias added after it unless it is bfloat16, then inside), and within ``FP8_TOLERANCE`` of
    the weight-only reference."""
    x, w8, bias = _case(40, dtype, seed=5)
    weight = quantize(w8.dequantize(torch.float32), "fp8")
    got = PATHS["scaled-mm"].run(x, weight, bias)
    xf = x.float()
    s = (xf.abs().amax(dim=1) / 448).clamp_min(TINY)
    codes = (xf / s[:, None]).to(torch.float8_e4m3fn).double()
    scales = s[:, None].double() * weight.scale.double()
    exact = (codes @ weight.data.double().T) * scales + bias.double()
    terms = (codes.abs() @ weight.data.double().abs().T) * scales + bias.double().abs()
    rounding = 2.0**-8 * (exact.abs() + (0 if dtype == torch.bfloat16 else bias.double().abs()))
    assert bool(((got.double() - exact).abs() <= rounding + 2.0**-20 * terms).all())
    reference = gk.quant_linear_reference(x, weight, bias)
    assert not _compare(got, reference, _quant_tolerance(dtype, torch.float8_e4m3fn))[2]


# ---------------------------------------------------------------------- the benchmark


def test_the_benchmark_dry_run_writes_ratios(tmp_path: Path):
    """``benchmarks/bench_w8a8.py --dry-run``: tiny shapes on the CPU, every case timed against
    bf16 ``F.linear`` in the same run, JSON written."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_w8a8.py"
    spec = importlib.util.spec_from_file_location("bench_w8a8", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "w8a8.json"
    bench.main(["--dry-run", "--out", str(out)])
    report = json.loads(out.read_text())
    cases = {r["case"] for r in report["results"]}
    assert {"bf16 F.linear", "int8-w8a8", "fp8 scaled-mm", "int8 dequantize + F.linear"} <= cases
    assert all(r["vs_bf16"] > 0 for r in report["results"] if "ms" in r)
