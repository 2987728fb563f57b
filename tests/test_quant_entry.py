"""Quantized weights as every entry point offers them: ``GlmImage``, ``glm-image generate`` and
``glm-image info --json`` (the released sizes, counted on the meta device). The formats, kernels
and quality bounds are proven in test_quant_formats.py, test_quant_kernels.py and
test_quant_engines.py; here: the option reaches both engines, is recorded, and fails early."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from glm_image import GlmImage
from glm_image.bench.metrics import psnr
from glm_image.errors import GlmImageError
from glm_image.quant.linear import QuantLinear


def test_int8_pipeline_quantizes_both_stages_and_stays_close(tiny_checkpoint, glm):
    pipe = GlmImage.from_pretrained(tiny_checkpoint, device="cpu", quantize="int8")
    assert pipe.quantize == "int8"
    assert any(isinstance(m, QuantLinear) for m in pipe.ar.model.modules())
    assert any(isinstance(m, QuantLinear) for m in pipe.dit.model.modules())
    assert not any(isinstance(m, QuantLinear) for m in pipe.dit.glyph.encoder.modules())  # ByT5 kept
    prior = glm.ar.generate_prior_tokens("'A'", 64, 64, seeds=[3])
    full = glm.dit.decode(glm.dit.denoise(prior, "'A'", 64, 64, 4, seeds=3))[0]
    quantized = pipe.dit.decode(pipe.dit.denoise(prior, "'A'", 64, 64, 4, seeds=3))[0]
    assert psnr(quantized, full) > 45  # measured ~59 dB on tiny (test_quant_engines holds the bound)
    assert not np.array_equal(np.asarray(quantized), np.asarray(full))


@pytest.mark.parametrize(
    ("quantize", "message"),
    [
        ("int5", "quantize = 'int5'"),
        ("int4", "ar=int4,dit=int8"),
        ("fp8", "fp8"),
    ],
)
def test_bad_schemes_fail_before_loading(tiny_checkpoint, monkeypatch, quantize, message):
    from glm_image.engine import ArEngine

    monkeypatch.setattr(ArEngine, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(GlmImageError, match=message):
        GlmImage.from_pretrained(tiny_checkpoint, device="cpu", quantize=quantize)


def test_generate_command_records_the_scheme(tiny_checkpoint, tmp_path, cli):
    out = tmp_path / "q.png"
    args = ["generate", "'A'", "--model", str(tiny_checkpoint), "--size", "64x64", "--steps", "1"]
    run = cli(*args, "--quantize", "int8", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert Image.open(out).text["quantize"] == "int8"
    bad = cli(*args, "--quantize", "int4", "-o", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "ar=int4,dit=int8" in bad.stderr and "Traceback" not in bad.stderr


def test_info_json_gives_the_released_sizes_and_plans(cli):
    def report(*args):  # the release's dtype (with no --dtype, info plans for this CPU's float32)
        run = cli("info", "--preset", "glm-image", "--json", "--dtype", "bfloat16", *args)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    int8 = report("--quantize", "int8")
    assert int8["components"]["ar_text_decoder"]["bytes"] <= 10e9
    assert int8["components"]["dit"]["bytes"] <= 7.5 * 2**30  # 7.82e9 bytes: AdaLN stays bf16
    int4 = report("--quantize", "ar=int4,dit=int8")
    assert int4["components"]["ar_text_decoder"]["bytes"] <= 6e9
    # the plan for an accelerator (the library with no device plans on meta; the command line
    # plans for the device generate would use, a CPU here, whose VAE needs more)
    from glm_image.info import memory_report
    from glm_image.synthetic.checkpoint import preset_dir

    def plan(max_memory):
        return memory_report(preset_dir("glm-image"), "int8", max_memory=max_memory)["plan"]

    resident = plan("24GiB")
    assert (resident["residency"], resident["fits"]) == ("resident", True)
    swap = plan("16GB")
    assert (swap["residency"], swap["fits"]) == ("swap", True) and swap["peak_bytes"] <= 16e9
