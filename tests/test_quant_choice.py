"""Which quantized path a linear runs (issue 24 item 6): chosen once per linear and kind of call,
not per call; and W8A8 only where the model allows it (the DiT's int8 linears, not the AR's)."""

from __future__ import annotations

import dataclasses

import glm_image_kernels as gk
import torch

from glm_image.ops.quant import TORCH_PATHS
from glm_image.ops.torch_ops import TorchOps
from glm_image.quant.formats import quantize
from glm_image.quant.linear import QuantLinear


def _counting_ops(calls: list[str]) -> TorchOps:
    """TorchOps whose paths record each time their conditions are read."""

    def counted(path):
        def unfit(x, weight):
            calls.append(path.name)
            return path.unfit(x, weight)

        return dataclasses.replace(path, unfit=unfit)

    ops = TorchOps("cpu")
    ops.quant_paths = tuple(counted(p) for p in TORCH_PATHS)
    return ops


def test_a_linear_chooses_its_path_once_per_kind_of_call():
    g = torch.Generator().manual_seed(0)
    weight = quantize(torch.randn(48, 64, generator=g) / 8, "int8")
    bias = torch.randn(48, generator=g)
    calls: list[str] = []
    ops = _counting_ops(calls)
    ops.verify_quant(torch.float32, "int8")  # the self-check, as an engine runs it after loading
    calls.clear()
    linear = QuantLinear(weight, bias, ops)
    decode = [torch.randn(3, 1, 64, generator=g) for _ in range(4)]  # 3 rows: a decode step
    prefill = [torch.randn(1, 200, 64, generator=g) for _ in range(4)]  # past MAX_QUANT_ROWS
    assert 200 > gk.MAX_QUANT_ROWS >= 3
    with torch.inference_mode():
        got = [linear(x) for x in decode + prefill]
        want = [TorchOps("cpu").quant_linear(x, weight, bias) for x in decode + prefill]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert calls == ["int8-float", "int8-float"]  # one choice per kind of call, then none
    assert set(linear.paths.values()) == {ops.quant_paths[0]}


def test_a_call_without_a_linear_chooses_every_time():
    weight = quantize(torch.randn(48, 64), "int8")
    calls: list[str] = []
    ops = _counting_ops(calls)
    ops.verify_quant(torch.float32, "int8")
    calls.clear()
    with torch.inference_mode():
        for _ in range(3):
            ops.quant_linear(torch.randn(2, 64), weight)
    assert calls == ["int8-float"] * 3


def test_only_the_dits_int8_linears_may_quantize_their_activations(tiny_checkpoint):
    from glm_image.engine import ArEngine, DitEngine

    ar = ArEngine.from_pretrained(tiny_checkpoint, quantize="int8")
    dit = DitEngine.from_pretrained(tiny_checkpoint, quantize="int8")
    flags = {
        name: {m.w8a8 for m in engine.model.modules() if isinstance(m, QuantLinear)}
        for name, engine in (("ar", ar), ("dit", dit))
    }
    assert flags == {"ar": {False}, "dit": {True}}
    w8a8 = next(p for p in TORCH_PATHS if p.name == "int8-w8a8")
    x = torch.randn(200, 64)
    weight = quantize(torch.randn(48, 64), "int8")
    assert "weight-only" in w8a8.unfit(x, weight)  # the AR's: never W8A8, on any device
    assert "cpu tensors" in w8a8.unfit(x, dataclasses.replace(weight, w8a8=True))
