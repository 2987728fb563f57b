"""The ``triton`` ops backend: when it can be chosen, when a call falls back (and says why), and
whole models giving the same results through it as through ``sdpa``.

On a CPU the kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``); on a
CUDA machine the model tests run the tiny checkpoint on the GPU. Tests that launch a kernel skip
when Triton is missing; the registry and twin tests need only torch.
"""

from __future__ import annotations

import importlib.util
import logging

import glm_image_kernels as gk
import pytest
import torch
from ar_helpers import prompt_logits

from glm_image.errors import GlmImageError
from glm_image.ops import TorchOps, available_backends, select_ops
from glm_image.ops.triton_ops import TritonOps

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(
    not gk.HAVE_TRITON or (DEVICE.type == "cpu" and not gk.interpreted()),
    reason="needs Triton (on CPU: imported under TRITON_INTERPRET=1)",
)
PROMPTS = ["a sign that says 'OPEN'", "一张海报，标题写着「春节快乐」"]  # different lengths: left padding


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------- choosing the backend


def _pretend_triton(monkeypatch, installed: bool) -> None:
    """The registry asks importlib whether Triton is installed; answer for it."""
    real = importlib.util.find_spec
    stand_in = real("torch") if installed else None
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: stand_in if name == "triton" else real(name, *a)
    )


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    _pretend_triton(monkeypatch, installed=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(GlmImageError, match="cannot run on cpu: Triton kernels run on CUDA devices, not cpu"):
        select_ops("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available_backends("cpu")["triton"] is None
    _pretend_triton(monkeypatch, installed=False)
    with pytest.raises(GlmImageError, match="Triton is not installed"):
        select_ops("triton", "cpu")


@needs_kernels
def test_triton_is_chosen_by_name_and_auto_keeps_sdpa_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops = select_ops("triton", "cpu")
    assert isinstance(ops, TritonOps) and ops.name == "triton" and ops.fallbacks == []
    assert select_ops("auto", "cpu").name == "sdpa"  # the interpreter is for tests, never a default
    if DEVICE.type == "cuda":
        assert select_ops("auto", DEVICE).name == "triton"


# ---------------------------------------------------------------------- the twins are the contract


def test_the_reference_ops_are_the_kernels_twins():
    """One copy of the reference maths: each sdpa op a kernel replaces is that kernel's twin,
    bound as is (pure torch, any machine); attention, which no kernel replaces, too."""
    twins = {
        "attention": gk.attention_reference,
        "decode_attention": gk.decode_attention_reference,
        "rms_norm": gk.rms_norm_reference,
        "add_rms_norm": gk.add_rms_norm_reference,
        "layer_norm_modulate": gk.layer_norm_modulate_reference,
        "rotary_": gk.rotary_reference_,
        "qk_norm_rope": gk.qk_norm_rope_reference,
    }
    for op, twin in twins.items():
        assert getattr(TorchOps, op) is twin, op
        assert getattr(TorchOps(), op) is twin, op
    assert TritonOps.attention is gk.attention_reference  # prefill stays torch SDPA


# ---------------------------------------------------------------------- per-call fallbacks


@needs_kernels
def test_unsupported_calls_fall_back_with_their_reason(caplog):
    ops, ref = TritonOps(DEVICE), TorchOps(DEVICE)
    caplog.set_level(logging.INFO, logger="glm_image.ops")

    # a head_dim the decode kernel does not take (twice: logged once)
    q, cache = _randn(1, 4, 1, 24, seed=1), _randn(1, 2, 10, 24, seed=2)
    visible = torch.ones(1, 10, dtype=torch.bool, device=DEVICE)
    for _ in range(2):
        out = ops.decode_attention(q, cache, cache, visible, scale=0.2, length=8)
        torch.testing.assert_close(out, ref.decode_attention(q, cache, cache, visible, scale=0.2, length=8))
    reason = "head_dim 24 (kernel needs a power of two in [16, 256])"
    assert ops.fallbacks == [("decode_attention", reason)]
    assert sum(reason in r.getMessage() for r in caplog.records) == 1

    # a float length tensor: the fallback does not read it back (no host sync); the mask, which
    # by the contract hides every slot at or past the bound, decides alone
    q32, cache32 = _randn(1, 4, 1, 32, seed=3), _randn(1, 2, 10, 32, seed=4)
    length = torch.tensor(8.0, device=DEVICE)
    bounded = visible.clone()
    bounded[:, 8:] = False
    out = ops.decode_attention(q32, cache32, cache32, bounded, scale=0.2, length=length)
    torch.testing.assert_close(out, ref.decode_attention(q32, cache32, cache32, bounded, scale=0.2, length=8))

    # float64, mixed dtypes, a strided last dim, shapes the kernels do not take
    x64 = _randn(3, 16, seed=5, dtype=torch.float64)
    assert torch.equal(ops.rms_norm(x64, x64[0], 1e-5), ref.rms_norm(x64, x64[0], 1e-5))
    x, w16 = _randn(3, 16, seed=6), _randn(16, seed=7, dtype=torch.bfloat16)
    for a, b in zip(ops.add_rms_norm(x, x, w16, 1e-5), ref.add_rms_norm(x, x, w16, 1e-5), strict=True):
        assert torch.equal(a, b)
    xt = _randn(2, 16, 5, seed=8).transpose(1, 2)  # (2, 5, 16), last stride 5
    mod = _randn(2, 1, 16, seed=9)
    assert torch.equal(
        ops.layer_norm_modulate(xt, mod, mod, 1e-5), ref.layer_norm_modulate(xt, mod, mod, 1e-5)
    )
    qk = _randn(1, 6, 2, 258, seed=10)
    cos, sin = _randn(4, 258, seed=11).cos(), _randn(4, 258, seed=11).sin()
    for a, b in zip(
        ops.qk_norm_rope(qk, qk, cos, sin, 2, 1e-5), ref.qk_norm_rope(qk, qk, cos, sin, 2, 1e-5), strict=True
    ):
        assert torch.equal(a, b)
    heads, odd = _randn(1, 2, 3, 16, seed=12), _randn(1, 2, 7, seed=13)
    expected = heads.clone()
    ref.rotary_(expected, odd, odd)
    ops.rotary_(heads, odd, odd)
    assert torch.equal(heads, expected)

    assert set(ops.fallbacks) == {
        ("decode_attention", reason),
        ("decode_attention", "a length tensor that is not one integer on the device"),
        ("rms_norm", "dtype torch.float64 (kernels take float16, bfloat16, float32)"),
        ("add_rms_norm", "mixed dtypes torch.bfloat16, torch.float32"),
        ("layer_norm_modulate", "a last dimension that is not contiguous"),
        ("qk_norm_rope", "head_dim 258 (kernel needs an even head_dim up to 256)"),
        ("rotary_", "x (1, 2, 3, 16), tables (1, 2, 7), (1, 2, 7)"),
    }


@needs_kernels
def test_fallback_when_inputs_need_gradients_or_the_kernels_are_not_interpreted(monkeypatch):
    ops = TritonOps(DEVICE)
    x = _randn(2, 8, seed=1).requires_grad_()
    w = _randn(8, seed=2)
    out = ops.rms_norm(x, w, 1e-5)
    out.sum().backward()  # the reference path keeps autograd working
    assert x.grad is not None
    assert ops.fallbacks == [("rms_norm", "inputs that need gradients (the kernels are inference-only)")]
    if DEVICE.type == "cpu":
        monkeypatch.setattr(gk, "interpreted", lambda: False)
        ops.rms_norm(x.detach(), w, 1e-5)
        assert ("rms_norm", "CPU tensors, and glm_image_kernels was imported without TRITON_INTERPRET=1") in (
            ops.fallbacks
        )


@needs_kernels
def test_supported_calls_take_the_kernels():
    ops, ref = TritonOps(DEVICE), TorchOps(DEVICE)
    x, r, w = _randn(3, 5, 32, seed=1), _randn(3, 5, 32, seed=2), _randn(32, seed=3)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    for a, b in zip(
        ops.add_rms_norm(x, r, w, 1e-5, pre_weight=w),
        ref.add_rms_norm(x, r, w, 1e-5, pre_weight=w),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    q, cache = _randn(2, 4, 1, 32, seed=4), _randn(2, 2, 20, 32, seed=5)
    visible = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    length = torch.tensor(13, dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(
        ops.decode_attention(q, cache, cache, visible, scale=0.2, length=length),
        ref.decode_attention(q, cache, cache, visible, scale=0.2, length=13),
    )
    assert ops.fallbacks == []


# ---------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def ar_engine(tiny_checkpoint):
    from glm_image.engine import ArEngine

    return ArEngine.from_pretrained(tiny_checkpoint, device=DEVICE)


@pytest.fixture(scope="module")
def dit_engine(tiny_checkpoint):
    from glm_image.engine import DitEngine

    return DitEngine.from_pretrained(tiny_checkpoint, device=DEVICE)


def _with_ops(engine, ops, fn):
    saved = engine.model.ops
    engine.model.ops = ops
    try:
        return fn()
    finally:
        engine.model.ops = saved


@needs_kernels
def test_ar_model_through_triton_equals_sdpa(ar_engine):
    ops = TritonOps(DEVICE)

    def run():
        logits, _ = prompt_logits(ar_engine, PROMPTS, 64, 64)
        result = ar_engine.generate(PROMPTS, 64, 64, greedy=True, max_new_tokens=12, return_logits=True)
        return logits, result

    ref_logits, expected = _with_ops(ar_engine, TorchOps(DEVICE), run)
    logits, ours = _with_ops(ar_engine, ops, run)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    assert torch.equal(ours.tokens, expected.tokens)
    for step, (a, b) in enumerate(zip(ours.logits, expected.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=f"decode step {step}")
    assert ops.fallbacks == []


@needs_kernels
def test_dit_model_through_triton_equals_sdpa(dit_engine):
    from glm_image.engine.dit_engine import _stack_padded

    model, glyph = dit_engine.model, dit_engine.glyph
    g = torch.Generator().manual_seed(5)
    cond, uncond = glyph.encode(["'a long quoted text to render'"]), glyph.encode([""])
    text, keep = _stack_padded(cond, uncond)  # a batched CFG forward with glyph padding
    latents = torch.randn(1, 16, 8, 12, generator=g).repeat(2, 1, 1, 1).to(DEVICE)
    prior = torch.randint(0, 16384, (2, 24), generator=g).to(DEVICE)
    drop = torch.tensor([[False], [True]], device=DEVICE).expand(2, 24)
    rest = (
        torch.tensor([500.0, 500.0], device=DEVICE),
        torch.tensor([[64.0, 96.0]] * 2, device=DEVICE),
        torch.zeros(2, 2, device=DEVICE),
    )
    ops = TritonOps(DEVICE)

    def run():
        with torch.inference_mode():
            return model(latents, text.to(DEVICE), prior, drop, *rest, text_keep=keep.to(DEVICE))

    expected = _with_ops(dit_engine, TorchOps(DEVICE), run)
    velocity = _with_ops(dit_engine, ops, run)
    torch.testing.assert_close(velocity, expected, rtol=0, atol=1e-4)
    assert ops.fallbacks == []

    prior64 = torch.randint(0, 16384, (1, 16), generator=g)
    noise = torch.randn(1, 16, 8, 8, generator=g)
    steps = [
        _with_ops(
            dit_engine, o, lambda: dit_engine.denoise(prior64, "'OPEN'", 64, 64, 2, latents=noise.clone())
        )
        for o in (TorchOps(DEVICE), ops)
    ]
    torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=1e-4)
