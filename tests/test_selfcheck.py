"""The self-check of the non-reference backends: every op against the reference before it serves,
broken kernels switched off (once, with one warning each), and whole images unchanged by it.

On a CPU the Triton kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``);
the npu backend runs against ``fake_torch_npu``. Each test starts from an empty process cache of
verdicts, so the check really runs.
"""

from __future__ import annotations

import logging

import glm_image_kernels as gk
import numpy as np
import pytest
import torch
from fake_torch_npu import install, make_module

from glm_image.config import CheckpointConfig
from glm_image.device import npu_module
from glm_image.errors import GlmImageError
from glm_image.ops import TorchOps, check_backend, selfcheck, torch_ops
from glm_image.ops.selfcheck import CheckSizes, format_check
from glm_image.synthetic import preset_dir

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(
    not gk.HAVE_TRITON or (DEVICE.type == "cpu" and not gk.interpreted()),
    reason="needs Triton (on CPU: imported under TRITON_INTERPRET=1)",
)
KERNEL_OPS = {
    "decode_attention",
    "window_attention",
    "rms_norm",
    "add_rms_norm",
    "layer_norm_modulate",
    "rotary_",
    "qk_norm_rope",
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
BROKEN = "no kernel image is available for execution on the device"


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """An empty process cache: what this test checks is checked again."""
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})


@pytest.fixture
def broken(monkeypatch):
    """Two kernels broken on purpose: add_rms_norm forgets the sandwich norm's pre_weight (wrong
    values), decode_attention raises as a kernel built for another GPU does. Returns the number
    of calls each received."""
    calls = {"add_rms_norm": 0, "decode_attention": 0}
    real_add_rms_norm = gk.add_rms_norm

    def add_rms_norm(x, residual, weight, eps, *, pre_weight=None):
        calls["add_rms_norm"] += 1
        return real_add_rms_norm(x, residual, weight, eps)

    def decode_attention(*args, **kwargs):
        calls["decode_attention"] += 1
        raise RuntimeError(BROKEN)

    monkeypatch.setattr(gk, "add_rms_norm", add_rms_norm)
    monkeypatch.setattr(gk, "decode_attention", decode_attention)
    return calls


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "glm_image.ops"
    ]


def test_default_sizes_are_the_released_models_and_the_tiny_ones_are_read():
    assert CheckSizes.from_config(CheckpointConfig.from_dir(preset_dir("glm-image"))) == CheckSizes()
    tiny = CheckpointConfig.from_dir(preset_dir("tiny"))
    sizes = CheckSizes.from_config(tiny)
    assert (sizes.heads, sizes.kv_heads, sizes.head_dim, sizes.rotary_dim) == (
        tiny.ar.text.num_attention_heads,
        tiny.ar.text.num_key_value_heads,
        tiny.ar.text.head_dim,
        tiny.ar.text.rotary_dim,
    )
    assert sizes.dit_heads * sizes.dit_head_dim == tiny.dit.hidden_size


# ---------------------------------------------------------------------- every op passes


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_triton_kernel_passes_at_the_released_sizes(dtype, caplog):
    rows = check_backend("triton", DEVICE, dtype)
    assert {row.op for row in rows} == KERNEL_OPS  # attention stays torch SDPA: nothing to check
    for row in rows:
        assert row.status == "ok", row
        assert row.max_abs_error <= row.bound and row.tolerance == selfcheck.TOLERANCES[dtype]
    assert _warnings(caplog) == []
    table = format_check(rows)
    assert "every op passed" in table and all(op in table for op in KERNEL_OPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_npu_op_passes_against_the_documented_contracts(monkeypatch, dtype):
    install(monkeypatch)
    try:
        from glm_image.ops.npu_ops import NpuOps

        ops = NpuOps("cpu")
        rows = ops.verify(dtype)
    finally:
        npu_module.cache_clear()
    statuses = {row.op: row.status for row in rows}
    fused = {"attention", "decode_attention", "rms_norm", "add_rms_norm", "rotary_", "qk_norm_rope", "swiglu"}
    fused.add("window_attention")  # its dense mask through npu attention
    assert set(statuses) == fused  # layer_norm_modulate is the reference's: nothing to check
    if dtype == torch.float32:  # outside the documented attention dtypes: the backend's own fallback
        assert statuses.pop("attention") == statuses.pop("decode_attention") == "fallback"
        assert statuses.pop("window_attention") == "fallback"
    assert set(statuses.values()) == {"ok"}
    assert ops.fallbacks == []  # the check's fallbacks are its own, not the engine's


def test_an_npu_operator_that_departs_from_its_documentation_is_switched_off(monkeypatch, caplog):
    """A torch_npu whose npu_swiglu gates with the second half (not what its documentation says):
    the check catches it, and swiglu runs on the reference from then on."""
    module = make_module()
    documented = module.npu_swiglu
    module.npu_swiglu = lambda x, dim=-1: documented(torch.cat(x.chunk(2, dim)[::-1], dim), dim)
    install(monkeypatch, module)
    try:
        from glm_image.ops.npu_ops import NpuOps

        ops = NpuOps("cpu")
        rows = ops.verify(torch.bfloat16)
    finally:
        npu_module.cache_clear()
    assert {row.op for row in rows if row.status == "FAILED"} == {"swiglu"}
    (told,) = _warnings(caplog)
    assert "swiglu failed its self-check" in told and "max |diff|" in told
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert torch.equal(ops.swiglu(x), TorchOps().swiglu(x))
    assert [op for op, _ in ops.fallbacks] == ["swiglu"]


def test_the_reference_backend_has_nothing_to_check():
    assert check_backend("sdpa", "cpu", torch.float32) == []
    assert check_backend("auto", "cpu", torch.bfloat16) == []  # auto on a CPU is sdpa
    assert "nothing to check" in format_check([])
    with pytest.raises(GlmImageError, match="cannot run on cpu"):
        check_backend("npu", "cpu", torch.bfloat16)


# ---------------------------------------------------------------------- broken kernels


@needs_kernels
def test_a_broken_kernel_is_switched_off_at_the_first_call(broken, caplog):
    """Nobody called verify: the first kernel call runs the check; the broken kernels are
    switched off with one warning each, and their later calls run on the reference."""
    from glm_image.ops.triton_ops import TritonOps

    ops, ref = TritonOps(DEVICE), TorchOps(DEVICE)
    g = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 3, 32, generator=g).to(DEVICE), torch.randn(2, 3, 32, generator=g).to(DEVICE)
    weight, pre = torch.rand(32, generator=g).to(DEVICE), torch.rand(32, generator=g).to(DEVICE)
    q, cache = (
        torch.randn(2, 4, 1, 32, generator=g).to(DEVICE),
        torch.randn(2, 2, 20, 32, generator=g).to(DEVICE),
    )
    visible = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    for _ in range(3):
        for a, b in zip(
            ops.add_rms_norm(x, residual, weight, 1e-5, pre_weight=pre),
            ref.add_rms_norm(x, residual, weight, 1e-5, pre_weight=pre),
            strict=True,
        ):
            assert torch.equal(a, b)
        out = ops.decode_attention(q, cache, cache, visible, scale=0.2, length=17)
        assert torch.equal(out, ref.decode_attention(q, cache, cache, visible, scale=0.2, length=17))
    assert broken == {"add_rms_norm": 1, "decode_attention": 1}  # the check's calls, none since

    told = _warnings(caplog)
    assert len(told) == 2
    (add,) = [m for m in told if ": add_rms_norm failed its self-check" in m]
    (decode,) = [m for m in told if ": decode_attention failed its self-check" in m]
    assert "max |diff|" in add and f"RuntimeError: {BROKEN}" in decode
    reasons = dict(ops.fallbacks)
    assert reasons["add_rms_norm"].startswith("switched off by the self-check: max |diff|")
    assert reasons["decode_attention"] == f"switched off by the self-check: RuntimeError: {BROKEN}"

    # another backend object on the same device and dtype: the verdict of the process, no new
    # check, no new warning
    rows = TritonOps(DEVICE).verify(torch.float32)
    assert {row.op: row.status for row in rows} == {
        op: "FAILED" if op in broken else "ok" for op in KERNEL_OPS
    }
    assert broken == {"add_rms_norm": 1, "decode_attention": 1} and len(_warnings(caplog)) == 2
    table = format_check(rows)
    assert "FAILED" in table and BROKEN in table and "2 op(s) switched off" in table


@needs_kernels
def test_no_check_while_a_graph_is_captured(monkeypatch):
    """The check reads results on the host, which a captured graph cannot: the kernel runs
    unchecked then, and the next eager call checks."""
    from glm_image.ops.triton_ops import TritonOps

    ops = TritonOps(DEVICE)
    x, weight = torch.ones(2, 16, device=DEVICE), torch.ones(16, device=DEVICE)
    monkeypatch.setattr(torch_ops, "capturing", lambda device_type: True)
    ops.rms_norm(x, weight, 1e-5)
    assert selfcheck._VERDICTS == {}
    monkeypatch.setattr(torch_ops, "capturing", lambda device_type: False)
    ops.rms_norm(x, weight, 1e-5)
    assert [key[0] for key in selfcheck._VERDICTS] == ["triton"]


@needs_kernels
@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="runs the kernels in Triton's interpreter on CPU tensors, which the tests enable only without "
    "CUDA; on a GPU the compiled kernels' parity and the self-check's fallback are the tests above",
)
def test_an_image_through_broken_kernels_equals_the_sdpa_one(broken, tiny_checkpoint, glm):
    """The whole pipeline on the triton backend with two kernels broken: they are switched off,
    the others run, and the image is the sdpa one. The kernels that still run compute in float32
    with another summation order (1e-6 relative, see test_ops_triton), so a pixel may at most
    round to the neighbouring 8-bit level; the prior tokens must be the same."""
    from glm_image import GlmImage

    pipe = GlmImage.from_pretrained(tiny_checkpoint, device="cpu", attention_backend="triton")
    assert pipe.attention_backend == "triton" and glm.attention_backend == "sdpa"
    prompt = "a sign that says 'OPEN'"
    ours = pipe.generate(prompt, 64, 64, num_inference_steps=2, seed=3)
    theirs = glm.generate(prompt, 64, 64, num_inference_steps=2, seed=3)
    assert torch.equal(ours.prior_token_ids, theirs.prior_token_ids)
    a, b = (np.asarray(out.images[0], dtype=np.int16) for out in (ours, theirs))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    assert broken == {"add_rms_norm": 1, "decode_attention": 1}
    reasons = dict(pipe.ar.model.ops.fallbacks)
    assert reasons["decode_attention"].startswith("switched off by the self-check")
    assert reasons["add_rms_norm"].startswith("switched off by the self-check")
