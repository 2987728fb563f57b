"""Device detection and the ops dispatcher: choices, refusals with reasons, fallbacks, the contract."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from glm_image.device import Platform, detect_platform, npu_module, resolve_device
from glm_image.errors import GlmImageError
from glm_image.ops import CHOICES, TorchOps, available_backends, select_ops

ROOT = Path(__file__).resolve().parent.parent


def test_detection_honours_the_override_and_names_bad_values(monkeypatch):
    monkeypatch.setenv("GLM_IMAGE_DEVICE", "cpu")
    assert detect_platform() is Platform.CPU
    monkeypatch.setenv("GLM_IMAGE_DEVICE", "tpu")
    with pytest.raises(
        GlmImageError, match="GLM_IMAGE_DEVICE = 'tpu' is not a device; allowed: cpu, cuda, npu"
    ):
        detect_platform()
    monkeypatch.delenv("GLM_IMAGE_DEVICE")
    expected = Platform.CUDA if torch.cuda.is_available() else Platform.CPU
    assert detect_platform() is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_unavailable_devices_are_refused_with_the_reason(monkeypatch):
    with pytest.raises(GlmImageError, match="device = 'tpu' is not supported; allowed: cpu, cuda, npu"):
        resolve_device("tpu")
    with pytest.raises(GlmImageError, match="device = 'cuda:0': no cuda device is available here"):
        resolve_device("cuda:0")
    assert npu_module() is None  # no torch_npu (it needs the CANN toolkit)
    with pytest.raises(GlmImageError, match="device = 'npu': no npu device"):
        resolve_device("npu")
    monkeypatch.setenv("GLM_IMAGE_DEVICE", "cuda")
    with pytest.raises(GlmImageError, match="GLM_IMAGE_DEVICE = 'cuda' but no cuda device is available"):
        detect_platform()


def test_only_device_py_imports_torch_npu():
    importers = [
        path.relative_to(ROOT)
        for folder in ("glm_image", "kernels")
        for path in (ROOT / folder).rglob("*.py")
        if "import torch_npu" in path.read_text() or 'import_module("torch_npu")' in path.read_text()
    ]
    assert importers == [Path("glm_image/device.py")]
    for path in (ROOT / "glm_image").rglob("*.py"):
        assert "import transfer_to_npu" not in path.read_text(), path


def test_auto_takes_the_best_usable_backend_and_logs_it_once(caplog):
    with caplog.at_level(logging.INFO, logger="glm_image.ops"):
        ops = select_ops("auto", "cpu", stage="AR")
    assert isinstance(ops, TorchOps) and ops.name == "sdpa"
    lines = [r.getMessage() for r in caplog.records if r.name == "glm_image.ops"]
    assert lines == [
        f"AR ops backend: sdpa on cpu (auto): {select_ops('sdpa', 'cpu').__class__.__name__}"
    ] or (len(lines) == 1 and lines[0].startswith("AR ops backend: sdpa on cpu (auto)"))
    assert available_backends("cpu")["sdpa"] is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("flash-3", "attention_backend = 'flash-3' is not known; allowed: auto, sdpa, triton, npu"),
        ("npu", "attention_backend = 'npu' cannot run on cpu: the npu backend serves Ascend NPUs, not cpu"),
    ],
)
def test_a_backend_that_cannot_serve_is_an_error_not_a_swap(name, message):
    assert CHOICES == ("auto", "sdpa", "triton", "npu")
    with pytest.raises(GlmImageError, match=message):
        select_ops(name, "cpu")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(GlmImageError, match="Triton kernels run on CUDA devices, not cpu"):
        select_ops("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_ops("triton", "cpu").name == "triton"


def test_fallbacks_are_recorded_once_with_their_reason(caplog):
    ops = TorchOps("cpu")
    with caplog.at_level(logging.INFO, logger="glm_image.ops"):
        for _ in range(3):
            ops.fallback("decode_attention", "head_dim 96 is not a power of two")
    assert ops.fallbacks == [("decode_attention", "head_dim 96 is not a power of two")]
    assert len([r for r in caplog.records if "falls back" in r.getMessage()]) == 1


def test_reference_decode_attention_may_skip_the_unused_tail():
    g = torch.Generator().manual_seed(0)
    b, h, kv, c, d = 2, 8, 2, 40, 16
    q = torch.randn(b, h, 1, d, generator=g)
    keys, values = torch.randn(b, kv, c, d, generator=g), torch.randn(b, kv, c, d, generator=g)
    visible = torch.zeros(b, c, dtype=torch.bool)
    visible[0, 3:25], visible[1, :25] = True, True
    keys[:, :, 25:] = float("nan")  # never visible: must not leak through the bound or the mask
    ops = TorchOps()
    bounded = ops.decode_attention(q, keys, values, visible, scale=d**-0.5, length=25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q,
        keys[:, :, :25].repeat_interleave(h // kv, 1),
        values[:, :, :25].repeat_interleave(h // kv, 1),
        attn_mask=visible[:, None, None, :25],
        scale=d**-0.5,
    )
    torch.testing.assert_close(bounded, expected, rtol=1e-6, atol=1e-6)
    # a device-tensor bound (a CUDA graph's) is not read on the host: the mask alone decides
    keys[:, :, 25:] = 0.0
    tensor_bound = ops.decode_attention(q, keys, values, visible, scale=d**-0.5, length=torch.tensor([25]))
    torch.testing.assert_close(tensor_bound, expected, rtol=1e-6, atol=1e-6)


def test_reference_residual_step_is_the_sandwich_norm():
    g = torch.Generator().manual_seed(1)
    x, residual = torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 32, generator=g)
    w, pre = torch.randn(32, generator=g), torch.randn(32, generator=g)

    def rms(t, weight):
        return weight * (t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5))

    ops = TorchOps()
    normed, new_residual = ops.add_rms_norm(x, residual, w, 1e-5, pre_weight=pre)
    torch.testing.assert_close(new_residual, residual + rms(x, pre))
    torch.testing.assert_close(normed, rms(residual + rms(x, pre), w))
    normed, new_residual = ops.add_rms_norm(x, residual, w, 1e-5)
    torch.testing.assert_close(normed, rms(residual + x, w))
