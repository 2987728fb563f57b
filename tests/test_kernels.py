"""Every Triton kernel against its torch reference twin, over a (dtype, atol, rtol) table.

Runs on CUDA when present, otherwise on CPU tensors in Triton's interpreter (conftest sets
``TRITON_INTERPRET=1`` before anything imports the kernels); skipped without Triton. Shapes are
small (the interpreter runs each program in Python) but cover what the models do: odd lengths,
batch > 1, GQA ratios 1-16, caches that are not a multiple of the chunk, strided views, ``length``
as an int and as a device tensor, hidden slots holding NaN/inf, left padding.

Outputs the kernels allocate are poisoned (``torch.empty`` fills NaN during the call), so a
result that matches proves every element was written and no unwritten partial was read.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import glm_image_kernels as gk

from glm_image.ops.selfcheck import TOLERANCES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not gk.interpreted():
    pytest.skip("CPU run without TRITON_INTERPRET=1 at import time", allow_module_level=True)

# Kernel vs twin over the engine's one tolerance table (its comment says why 16-bit results may
# differ by a few units in the last place), element by element here; the self-check holds the
# same numbers relative to each output's scale.
DTYPES = list(TOLERANCES)
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _randn(
    *shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, shift: float = 0.0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).to(DEVICE)


@pytest.fixture
def poisoned(monkeypatch):
    """A context in which ``torch.empty`` returns NaN-filled float tensors (the kernels' outputs
    and partial buffers)."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    class Poison:
        def __enter__(self):
            monkeypatch.setattr(torch, "empty", empty)

        def __exit__(self, *exc):
            monkeypatch.setattr(torch, "empty", real)

    return Poison()


# ---------------------------------------------------------------------- decode attention

# (B, H, KV, capacity, D, bound, length, split_size): length passed as "int", "tensor" or None
# (then bound = capacity); split_size None = the default heuristic
DECODE_CASES = [
    (2, 4, 2, 50, 32, 41, "int", 16),  # several chunks, the last one partial, GQA 2
    (1, 32, 2, 77, 128, 70, "tensor", 32),  # the released heads (GQA 16), a device-tensor bound
    (3, 8, 1, 20, 16, 20, None, None),  # the whole cache, one KV head for 8 query heads
    (2, 2, 2, 33, 64, 33, "int", 16),  # no grouping (MHA), bound = capacity
    (2, 4, 1, 45, 32, 17, "tensor", 16),  # tensor bound: the chunks past it exit early
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_attention(case, dtype, poisoned):
    b, h, kv, capacity, d, bound, length_kind, split = case
    seed = sum(case[:6])
    # q is a strided view of a fused qkv projection, as in the model
    qkv = _randn(b, 1, h + 2 * kv, d, dtype=dtype, seed=seed)
    q = qkv[:, :, :h].transpose(1, 2)
    keys = _randn(b, kv, capacity, d, dtype=dtype, seed=seed + 1)
    values = _randn(b, kv, capacity, d, dtype=dtype, seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    visible = torch.rand(b, capacity, generator=g) > 0.25
    visible[:, bound:] = False
    visible[-1, :5] = False  # left padding of the last row
    visible[:, bound - 1] = True  # the slot just written
    visible = visible.to(DEVICE)
    # what the reference sees, then poison every hidden slot: it must never reach the result
    expected = gk.decode_attention_reference(q, keys, values, visible, scale=d**-0.5, length=bound)
    hidden = ~visible[:, None, :, None].expand(b, kv, capacity, d)
    keys = keys.masked_fill(hidden, float("nan"))
    values = values.masked_fill(hidden, float("inf"))
    length = {"int": bound, "tensor": torch.tensor(bound, dtype=torch.int32, device=DEVICE), None: None}
    with poisoned:
        out = gk.decode_attention(
            q, keys, values, visible, scale=d**-0.5, length=length[length_kind], split_size=split
        )
    assert out.is_contiguous()
    _close(out, expected, dtype, f"decode {case}")


def test_decode_attention_length_tensor_int64_and_launches():
    """An int64 bound, and every chunk length and tile, give the same result."""
    q = _randn(2, 4, 1, 32, dtype=torch.float32, seed=1)
    keys, values = (_randn(2, 2, 40, 32, dtype=torch.float32, seed=s) for s in (2, 3))
    visible = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    expected = gk.decode_attention_reference(q, keys, values, visible, scale=0.2, length=29)
    length = torch.tensor([29], dtype=torch.int64, device=DEVICE)
    for split, tile in ((16, None), (48, None), (64, None), (64, 32), (32, 16)):
        out = gk.decode_attention(
            q, keys, values, visible, scale=0.2, length=length, split_size=split, block_n=tile
        )
        _close(out, expected, torch.float32, f"split {split}, tile {tile}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_decode_attention_product_paths(dtype):
    """16-bit inputs: the native tensor-core path on a GPU, float32 operands otherwise; both
    agree with the twin (the interpreter refuses the native path)."""
    b, h, kv, capacity, d = 2, 32, 2, 200, 128
    q = _randn(b, h, 1, d, dtype=dtype, seed=1)
    keys, values = (_randn(b, kv, capacity, d, dtype=dtype, seed=s) for s in (2, 3))
    visible = torch.ones(b, capacity, dtype=torch.bool, device=DEVICE)
    expected = gk.decode_attention_reference(q, keys, values, visible, scale=d**-0.5, length=187)
    paths = (True, False) if DEVICE.type == "cuda" else (False,)
    for native in paths:
        out = gk.decode_attention(q, keys, values, visible, scale=d**-0.5, length=187, native_dot=native)
        _close(out, expected, dtype, f"native_dot={native}")
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="native_dot needs 16-bit inputs on CUDA"):
            gk.decode_attention(q, keys, values, visible, scale=d**-0.5, native_dot=True)


def test_decode_attention_rejects_bad_inputs():
    q = torch.zeros(1, 4, 2, 32, device=DEVICE)
    cache = torch.zeros(1, 2, 8, 32, device=DEVICE)
    visible = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        gk.decode_attention(q, cache, cache, visible, scale=1.0)
    with pytest.raises(ValueError, match="must be a multiple of"):
        gk.decode_attention(q[:, :, :1], cache, cache, visible, scale=1.0, split_size=24)
    with pytest.raises(ValueError, match="must be 16, 32 or 64"):
        gk.decode_attention(q[:, :, :1], cache, cache, visible, scale=1.0, block_n=128)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_decode_attention_replays_in_a_cuda_graph_with_a_changing_bound():
    b, h, kv, capacity, d = 2, 32, 2, 300, 128
    q = _randn(b, h, 1, d, dtype=torch.bfloat16, seed=1)
    keys, values = (_randn(b, kv, capacity, d, dtype=torch.bfloat16, seed=s) for s in (2, 3))
    visible = torch.zeros(b, capacity, dtype=torch.bool, device=DEVICE)
    length = torch.zeros((), dtype=torch.int32, device=DEVICE)
    visible[:, :100] = True
    length.fill_(100)
    gk.decode_attention(q, keys, values, visible, scale=d**-0.5, length=length)  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gk.decode_attention(q, keys, values, visible, scale=d**-0.5, length=length)
    for bound in (100, 101, 257, 300):
        visible[:, :bound] = True
        length.fill_(bound)
        graph.replay()
        expected = gk.decode_attention_reference(q, keys, values, visible, scale=d**-0.5, length=bound)
        _close(out, expected, torch.bfloat16, f"replay at {bound}")


# ---------------------------------------------------------------------- M-RoPE apply

# (B, T, q heads, kv heads, D, rot)
ROTARY_CASES = [
    (2, 3, 4, 2, 32, 16),  # the tiny model
    (1, 1, 32, 2, 128, 64),  # a released decode step
    (2, 5, 3, 1, 24, 12),  # half = 6: not a power of two
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ROTARY_CASES, ids=lambda c: "-".join(map(str, c)))
def test_rotary(case, dtype):
    b, t, hq, hk, d, rot = case
    seed = sum(case)
    qkv = _randn(b, t, hq + 2 * hk, d, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    angles = torch.rand(b, t + 2, rot // 2, generator=g) * 20
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype).to(DEVICE)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype).to(DEVICE)
    cos, sin = cos[:, 1 : t + 1], sin[:, 1 : t + 1]  # strided row slices, as the decode loop takes them
    expected, actual = qkv.clone(), qkv.clone()
    gk.rotary_reference_(expected[:, :, : hq + hk], cos, sin)
    gk.rotary_(actual[:, :, : hq + hk], cos, sin)
    _close(actual, expected, dtype, f"rotary {case}")
    # the value heads and the channels past rot are left exactly as they were
    assert torch.equal(actual[:, :, hq + hk :], qkv[:, :, hq + hk :])
    assert torch.equal(actual[..., rot:], qkv[..., rot:])


# ---------------------------------------------------------------------- RMSNorm (+ residual)

NORM_SHAPES = [(2, 5, 96), (1, 1, 4096), (7, 33)]


def _strided(x: torch.Tensor, pad: int = 8) -> torch.Tensor:
    """The same values as a view with a row stride past the row (a slice of a wider tensor)."""
    wide = torch.full((*x.shape[:-1], x.shape[-1] + pad), float("nan"), dtype=x.dtype, device=x.device)
    wide[..., : x.shape[-1]] = x
    return wide[..., : x.shape[-1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm(shape, dtype, poisoned):
    seed = sum(shape)
    x = _strided(_randn(*shape, dtype=dtype, seed=seed, scale=3.0))
    weight = _randn(shape[-1], dtype=dtype, seed=seed + 1, scale=0.5, shift=1.0)
    expected = gk.rms_norm_reference(x, weight, 1e-6)
    with poisoned:
        out = gk.rms_norm(x, weight, 1e-6)
    _close(out, expected, dtype, f"rms_norm {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pre", [False, True], ids=["plain", "sandwich"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm(shape, pre, dtype, poisoned):
    seed = sum(shape) + pre
    x = _strided(_randn(*shape, dtype=dtype, seed=seed, scale=2.0))
    residual = _randn(*shape, dtype=dtype, seed=seed + 1, scale=4.0)
    weight = _randn(shape[-1], dtype=dtype, seed=seed + 2, scale=0.5, shift=1.0)
    pre_weight = _randn(shape[-1], dtype=dtype, seed=seed + 3, scale=0.5, shift=1.0) if pre else None
    normed, new_residual = gk.add_rms_norm_reference(x, residual, weight, 1e-5, pre_weight=pre_weight)
    with poisoned:
        out, out_residual = gk.add_rms_norm(x, residual, weight, 1e-5, pre_weight=pre_weight)
    _close(out_residual, new_residual, dtype, f"new_residual {shape}")
    _close(out, normed, dtype, f"normed {shape}")
    # normed is the norm of the residual as stored (rounded), so the two outputs agree exactly
    again = gk.rms_norm(out_residual, weight, 1e-5)
    if DEVICE.type == "cpu":
        assert torch.equal(out, again)
    else:  # a compiler may contract the two kernels' float32 maths differently: one unit apart
        torch.testing.assert_close(out, again, atol=0, rtol=2 * torch.finfo(dtype).eps)


# ---------------------------------------------------------------------- LayerNorm + modulate

# (B, N, dim, scale/shift batch)
ADALN_CASES = [(2, 7, 80, 2), (1, 33, 64, 1), (3, 4, 4096, 3), (2, 5, 48, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ADALN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_layer_norm_modulate(case, dtype, poisoned):
    b, n, dim, mb = case
    seed = sum(case)
    x = _randn(b, n, dim, dtype=dtype, seed=seed, scale=2.0, shift=0.5)
    # scale and shift are chunks of the modulation GEMM output (B, 12 * dim): batch stride 12 * dim
    modulation = _randn(mb, 12 * dim, dtype=dtype, seed=seed + 1, scale=0.3)
    scale, shift = (m.unsqueeze(1) for m in modulation.chunk(12, dim=1)[2:4])
    expected = gk.layer_norm_modulate_reference(x, scale, shift, 1e-5)
    with poisoned:
        out = gk.layer_norm_modulate(x, scale, shift, 1e-5)
    _close(out, expected, dtype, f"layer_norm_modulate {case}")


# ---------------------------------------------------------------------- QK LayerNorm + 2D RoPE

# (B, S, heads, D, text_len)
QK_CASES = [(2, 9, 3, 32, 4), (1, 20, 32, 128, 3), (2, 5, 2, 64, 5), (1, 6, 4, 48, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", QK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_qk_norm_rope(case, dtype, poisoned):
    b, s, heads, d, text_len = case
    seed = sum(case)
    qkv = _randn(b, s, 3, heads, d, dtype=dtype, seed=seed, scale=2.0, shift=0.3)
    q, k, _ = qkv.unbind(2)  # strided views of the fused projection, as in the model
    g = torch.Generator().manual_seed(seed + 1)
    angles = (torch.rand(s - text_len, d // 2, generator=g) * 30).repeat(1, 2).to(DEVICE)
    cos, sin = angles.cos(), angles.sin()
    expected = gk.qk_norm_rope_reference(q, k, cos, sin, text_len, 1e-5)
    with poisoned:
        out = gk.qk_norm_rope(q, k, cos, sin, text_len, 1e-5)
    for name, a, e in zip("qk", out, expected, strict=True):
        assert a.is_contiguous()
        _close(a, e.contiguous(), dtype, f"{name} {case}")


# ---------------------------------------------------------------------- GPU compilation, no GPU

_COMPILE_SCRIPT = r"""
import sys, importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FLOATS = {"eps", "scale_log2"}
failed = []
for module, name, dtype, pointers, constexprs, warps in CASES:
    kernel = getattr(importlib.import_module("glm_image_kernels." + module), name)
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + pointers.get(arg, dtype)
        else:
            signature[arg] = "fp32" if arg in FLOATS else "i32"
    where = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=where), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps})
    except Exception as e:
        failed.append(f"{module}.{name} {dtype} {constexprs}: {type(e).__name__}: {e}")
        continue
    if compiled.metadata.shared > 99 * 1024:  # what an RTX 4090 / L4 gives one program
        failed.append(f"{module}.{name} {dtype} {constexprs}: {compiled.metadata.shared} bytes of shared memory")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""

_PARTIALS = {"part_o_ptr": "fp32", "part_lse_ptr": "fp32"}
_SPLIT = {"GROUP": 16, "BLOCK_G": 16, "HEAD_DIM": 128}
_TILE = {
    "bf16": {"BLOCK_N": 64, "TILES": 2},
    "fp16": {"BLOCK_N": 64, "TILES": 2},
    "fp32": {"BLOCK_N": 32, "TILES": 4},
}
_COMPILE_CASES = [
    case
    for dtype in ("bf16", "fp16", "fp32")
    for case in [
        (
            "flash_decoding",
            "_split_kernel",
            dtype,
            {"vis_ptr": "u8", "len_ptr": "i32", **_PARTIALS},
            {**_SPLIT, **_TILE[dtype], "LENGTH_IN_TENSOR": True, "NATIVE_DOT": dtype != "fp32"},
            4,
        ),
        (
            "flash_decoding",
            "_split_kernel",
            dtype,
            {"vis_ptr": "u8", "len_ptr": "u8", **_PARTIALS},
            {**_SPLIT, **_TILE[dtype], "LENGTH_IN_TENSOR": False, "NATIVE_DOT": False},
            4,
        ),
        (
            "flash_decoding",
            "_reduce_kernel",
            dtype,
            {"len_ptr": "i64", **_PARTIALS},
            {"HEAD_DIM": 128, "BLOCK_S": 16, "LENGTH_IN_TENSOR": True},
            4,
        ),
        (  # a Jacobi window of 8 at the released GQA 16: 128 rows per program (16 in float32)
            "window_attention",
            "_window_split_kernel",
            dtype,
            {"vis_ptr": "u8", "qs_ptr": "i64", "len_ptr": "i32", **_PARTIALS},
            {
                "GROUP": 16,
                "BLOCK_M": 16 if dtype == "fp32" else 128,
                "HEAD_DIM": 128,
                **_TILE[dtype],
                "LENGTH_IN_TENSOR": True,
                "NATIVE_DOT": dtype != "fp32",
            },
            4 if dtype == "fp32" else 8,
        ),
        ("rotary", "_rotary_kernel", dtype, {}, {"HALF": 32, "BLOCK_R": 32, "BLOCK_H": 64}, 4),
        ("residual_norm", "_rms_norm_kernel", dtype, {}, {"BLOCK": 4096}, 8),
        ("residual_norm", "_add_rms_norm_kernel", dtype, {}, {"HAS_PRE": True, "BLOCK": 4096}, 8),
        ("adaln", "_layer_norm_modulate_kernel", dtype, {}, {"BLOCK": 4096}, 8),
        (
            "dit_qk",
            "_qk_norm_rope_kernel",
            dtype,
            {"cos_ptr": "fp32", "sin_ptr": "fp32"},
            {"HALF": 64, "BLOCK_R": 64, "BLOCK_H": 32},
            4,
        ),
    ]
]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU every test above compiles the kernels for real")
def test_kernels_compile_for_hopper_without_a_gpu():
    """Triton's own compiler (frontend, lowering, ptxas) builds every kernel for sm_90 at the
    released shapes: what the interpreter cannot check (GPU typing rules, layouts, registers)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = f"CASES = {_COMPILE_CASES!r}\n{_COMPILE_SCRIPT}"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
