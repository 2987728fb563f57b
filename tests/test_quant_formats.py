"""Quantized weights: the formats' round trips, the scheme a user writes, and every quantized
matmul (torch's, the Triton GEMV in the interpreter, the npu op against its documented contract)
against the reference ``quant_linear_reference`` (dequantize + ``F.linear``)."""

from __future__ import annotations

import glm_image_kernels as gk
import pytest
import torch
import torch.nn.functional as F
from glm_image_kernels.quant_linear import DEQUANTIZE_ELEMENTS

from glm_image.errors import GlmImageError
from glm_image.ops import TorchOps
from glm_image.ops.selfcheck import TOLERANCES
from glm_image.quant import QuantScheme, check_device, formats, parse_quantize
from glm_image.quant.formats import int4_error_bound, quantize

DTYPES = list(TOLERANCES)
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _weight(out: int, cols: int, seed: int, *, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) / cols**0.5 + shift
    w[1] = 0.0  # an all-zero row (scale 1, not 0/0)
    w[2, :32] = 0.25  # a constant group
    return w


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("cols", [96, 256])
def test_int8_round_trips_within_half_a_step(cols):
    w = _weight(40, cols, 0)
    q = quantize(w, "int8")
    assert q.data.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert int(q.data.abs().max()) <= 127 and q.nbytes == w.numel() + 4 * w.shape[0]
    error = (q.dequantize() - w).abs()
    assert bool((error <= q.scale[:, None] / 2 * (1 + 1e-6)).all())
    assert torch.equal(q.dequantize()[1], w[1])  # the zero row is exact
    # the largest element of a row is exact: the scale is max|row| / 127
    rows = torch.arange(w.shape[0])
    top = w.abs().argmax(dim=1)
    torch.testing.assert_close(q.dequantize()[rows, top], w[rows, top], rtol=1e-6, atol=0)


@pytest.mark.parametrize(("cols", "group"), [(256, 128), (192, 64), (96, 32)])
@pytest.mark.parametrize("shift", [0.0, 3.0])  # groups far from zero: the bf16 zero's rounding shows
def test_int4_round_trips_within_its_bound_and_stores_four_bits_per_weight(cols, group, shift):
    w = _weight(40, cols, 1, shift=shift)
    q = quantize(w, "int4")
    assert q.group == group == formats.default_group(cols)
    assert q.data.dtype == torch.uint8 and q.data.shape == (40, cols // 2)  # two codes per byte
    assert q.scale.dtype == q.zero.dtype == torch.bfloat16 and q.scale.shape == (40, cols // group)
    assert q.nbytes == w.numel() // 2 + 2 * 2 * 40 * (cols // group)
    error = (q.dequantize() - w).abs().view(40, cols // group, group)
    assert bool((error <= int4_error_bound(q)[..., None] * (1 + 1e-6)).all())
    codes = gk.unpack_int4(q.data)
    assert int(codes.max()) <= 15 and codes.shape == w.shape
    # the bound is not vacuous: most elements are within half a step
    assert float((error <= q.scale.float()[..., None] / 2).float().mean()) > 0.95


def test_fp8_round_trips_within_e4m3s_precision():
    w = _weight(40, 256, 2)
    w[3, :8] = torch.tensor([1e-6, -1e-5, 3e-4, 0.0, 5.0, -5.0, 1e-3, 2e-3])  # subnormals, the max
    q = quantize(w, "fp8")
    assert q.data.dtype == torch.float8_e4m3fn
    error = (q.dequantize() - w).abs()
    bound = torch.maximum(w.abs() * 2.0**-4, q.scale[:, None] * 2.0**-10)  # half a mantissa step
    assert bool((error <= bound * (1 + 1e-6)).all())
    assert float(q.dequantize()[3, 4]) == 5.0  # the row's largest element is exact


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quantizing_in_row_blocks_equals_all_at_once(kind, monkeypatch):
    w = _weight(37, 128, 3)
    whole = quantize(w, kind)
    monkeypatch.setattr(formats, "CHUNK", 128 * 5)  # 5 rows at a time, the last block partial
    blocks = quantize(w, kind)
    for a, b in zip(
        (whole.data, whole.scale, whole.zero), (blocks.data, blocks.scale, blocks.zero), strict=True
    ):
        assert (a is None and b is None) or torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---------------------------------------------------------------------- the scheme


def test_quantize_spellings():
    assert parse_quantize(None) == parse_quantize("none") == QuantScheme("none", "none")
    assert parse_quantize("INT8") == QuantScheme("int8", "int8")
    assert parse_quantize("ar=int4,dit=int8") == QuantScheme("int4", "int8")
    assert parse_quantize(" ar = int8 ") == QuantScheme("int8", "none")
    assert parse_quantize("auto").auto
    assert (
        str(parse_quantize("ar=int4,dit=fp8")) == "ar=int4,dit=fp8" and str(parse_quantize("int8")) == "int8"
    )


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("int3", "quantize = 'int3' is not known; allowed: none, int8, fp8, int4 (AR only), auto"),
        ("int4", "int4 is built for the AR only (the DiT allows none, int8, fp8)"),
        ("dit=int4", "dit='int4' is not built; allowed for dit: none, int8, fp8"),
        ("vae=int8", "unknown stage 'vae'; allowed stages: ar, dit"),
        ("ar=int8,ar=int4", "stage 'ar' is given twice"),
        ("ar=int2", "ar='int2' is not built; allowed for ar: none, int8, fp8, int4"),
    ],
)
def test_a_quantize_that_is_not_allowed_says_what_is(spec, says):
    with pytest.raises(GlmImageError, match="quantize") as e:
        parse_quantize(spec)
    assert says in str(e.value)


def test_fp8_needs_a_cuda_gpu_with_fp8(monkeypatch):
    with pytest.raises(GlmImageError, match=r"fp8 needs a CUDA GPU .* not cpu; allowed here: none, int8"):
        check_device(parse_quantize("ar=int8,dit=fp8"), "cpu")
    check_device(parse_quantize("int8"), "cpu")  # int8 runs everywhere
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(GlmImageError, match=r"compute capability 8\.9 or newer; NVIDIA A100 has 8\.0"):
        check_device(parse_quantize("fp8"), "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device(parse_quantize("fp8"), "cuda")  # an H100


# ---------------------------------------------------------------------- the quantized matmuls


def _case(kind: str, rows: int, dtype: torch.dtype, seed: int, *, bias: bool = True, out: int = 70):
    g = torch.Generator().manual_seed(seed)
    cols = 256
    weight = quantize(torch.randn(out, cols, generator=g) / cols**0.5, kind)
    x = torch.randn(2, rows, cols, generator=g).to(dtype)  # (B, T, K): a model's activations
    b = (torch.randn(out, generator=g) * 0.1).to(dtype) if bias else None
    return x, weight, b


def test_the_reference_is_dequantize_then_linear():
    x, weight, bias = _case("int4", 3, torch.float32, 0)
    want = F.linear(x, weight.dequantize(), bias)
    assert torch.equal(gk.quant_linear_reference(x, weight, bias), want)
    # by hand, int8: w = q * scale
    x, weight, bias = _case("int8", 3, torch.float64, 1)
    torch.testing.assert_close(
        gk.quant_linear_reference(x, weight, bias),
        x @ (weight.data.double() * weight.scale[:, None]).T + bias,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("kind", "rows", "path"), [("int8", 1, "int8-float"), ("int8", 8, "int8-float"),
                                                    ("int8", 9, "int8-float"), ("int8", 600, "int8-float"),
                                                    ("fp8", 1, "scaled-mm"), ("fp8", 9, "scaled-mm"),
                                                    ("int4", 1, None)])  # fmt: skip
def test_torchs_quantized_matmuls_equal_the_reference(kind, rows, path, dtype):
    """The sdpa backend's paths on a CPU (``rows`` x 2 rows reach the op); int4 has no CPU path.
    Each is held to the tolerance of the precision its activations are computed in."""
    ops = TorchOps("cpu")
    x, weight, bias = _case(kind, rows, dtype, 2)
    want = gk.quant_linear_reference(x, weight, bias)
    got = ops.quant_linear(x, weight, bias)
    fits = [
        p.name for p in ops.quant_paths if kind in p.kinds and p.unfit(x.reshape(-1, 256), weight) is None
    ]
    assert fits[:1] == ([path] if path else [])
    assert got.dtype == dtype and got.shape == want.shape
    precision = {"int8pack": TOLERANCES[torch.bfloat16], "int8-split": TOLERANCES[torch.float16],
                 "scaled-mm": (1e-3, 6e-2)}.get(path, (0.0, 0.0))  # fmt: skip
    atol, rtol = (max(a, b) for a, b in zip(TOLERANCES[dtype], precision, strict=True))
    bound = atol + rtol * float(want.float().abs().max())
    assert float((got.float() - want.float()).abs().max()) <= bound


def test_the_int8_split_is_exact_to_sixteen_bits():
    """``x ~ s * (hi + lo / 254)``: with float64 maths the only error is the activations'
    rounding, at most s / 508 per element, far below bfloat16's."""
    x, weight, _ = _case("int8", 300, torch.float32, 3, bias=False)
    got = TorchOps("cpu").quant_linear(x, weight)
    exact = x.double() @ weight.dequantize(torch.float64).T
    s = x.abs().amax(dim=-1, keepdim=True).double() / 127
    bound = s / 508 * weight.dequantize(torch.float64).abs().sum(dim=1) + 1e-5 * exact.abs()
    assert bool(((got.double() - exact).abs() <= bound).all())


def test_every_torch_path_passes_its_self_check():
    from glm_image.ops.selfcheck import verify_quant

    ops = TorchOps("cpu")
    rows = {
        row.op: row
        for kind in ("int8", "fp8", "int4")
        for row in verify_quant(ops, "cpu", torch.float32, kind)
    }
    assert set(rows) == {
        "quant_linear[int8] int8-float",
        "quant_linear[int8] int8pack",
        "quant_linear[int8] int8-split",
        "quant_linear[fp8] scaled-mm",
    }
    assert all(row.status == "ok" and row.max_abs_error <= row.bound for row in rows.values())


def test_a_path_that_disagrees_is_switched_off_and_the_reference_serves(monkeypatch, caplog):
    from glm_image.ops import quant as quant_paths
    from glm_image.ops import selfcheck

    broken = quant_paths.QuantPath(
        "broken", ("int8",), lambda x, w: None, lambda x, w, b: gk.quant_linear_reference(x, w, b) * 1.1
    )

    class Broken(TorchOps):
        name = "broken-quant"
        quant_paths = (broken,)

    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    ops = Broken("cpu")
    x, weight, bias = _case("int8", 2, torch.float32, 4)
    got = ops.quant_linear(x, weight, bias)  # the first call checks, fails, falls back
    assert torch.equal(got, gk.quant_linear_reference(x, weight, bias))
    assert any("quant_linear[int8] broken failed its self-check" in r.getMessage() for r in caplog.records)
    assert ops.fallbacks and "switched off by the self-check" in ops.fallbacks[0][1]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_dequantizing_a_wide_weight_holds_little_beside_the_result(kind):
    """A prefill GEMM on a GPU dequantizes a whole weight; a float32 copy of all of it and its
    product (4 bytes an element, twice) would be 4x the bf16 result (0.9 GB for the AR's gate/up,
    measured on an H200). Row blocks keep the temporaries to a few MiB: the process's peak grows
    by the result and little more, and the values are those of the one-shot formula. The peak is
    measured in a process of its own: a test worker's other threads (a server a module left
    running, a rank group's readers) would add their own allocations to it."""
    import json
    import subprocess
    import sys

    code = (
        "import json, torch\n"
        "from glm_image.bench.memory import PeakMemory\n"
        "from glm_image.quant.formats import quantize\n"
        "w = torch.randn(8192, 4096, generator=torch.Generator().manual_seed(0)) / 64\n"
        f"q = quantize(w, {kind!r})\n"
        "del w\n"
        "with PeakMemory('cpu') as memory:\n"
        "    got = q.dequantize(torch.bfloat16)\n"
        "print(json.dumps({'method': memory.method, 'increase': memory.increase}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    if "VmHWM" not in memory["method"]:
        pytest.skip("needs Linux's peak RSS")
    w = torch.randn(8192, 4096, generator=torch.Generator().manual_seed(0)) / 64
    q = quantize(w, kind)
    got = q.dequantize(torch.bfloat16)
    result = got.numel() * got.element_size()  # 64 MiB; one float32 copy: 128 MiB, and the old
    block = DEQUANTIZE_ELEMENTS * 4  # formula held two to four at once
    assert memory["increase"] < result + 4 * block, memory["increase"]
    rows = slice(100, 200)
    assert torch.equal(got[rows], q._rows(rows).to(torch.bfloat16))
