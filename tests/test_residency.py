"""The memory planner and ``info --quantize --json``: sizes of the released preset on the meta
device against an independent count from its config, the residency a budget gets, and the
estimate against what loading and generating on the tiny checkpoint really take."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from glm_image.config import CheckpointConfig
from glm_image.errors import GlmImageError
from glm_image.info import memory_report
from glm_image.residency import RESERVE, estimate_memory, parse_memory, plan_memory, weight_bytes
from glm_image.synthetic import preset_dir

RELEASED = preset_dir("glm-image")
GIB = 2**30


def test_memory_sizes():
    assert parse_memory("16GB") == 16 * 10**9 and parse_memory("16GiB") == 16 * GIB
    assert parse_memory(" 512 mb ") == 512 * 10**6 and parse_memory("1.5GiB") == int(1.5 * GIB)
    assert parse_memory(1234) == 1234 and parse_memory(None) is None
    for bad in ("16XB", "-1GB", "0GB", "GB", 0):
        with pytest.raises(GlmImageError, match=r"max_memory = .*allowed: a positive size"):
            parse_memory(bad)


def _ar_bytes(config: CheckpointConfig, kind: str) -> int:
    """The AR text decoder's bytes from its config alone: bf16, quantized matrices in ``kind``."""
    t = config.ar.text
    h, i, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    matrices = [(qkv, h), (h, t.num_attention_heads * t.head_dim), (2 * i, h), (h, i)]  # (out, in)
    if kind == "int8":
        per_layer = sum(o * k + 4 * o for o, k in matrices)
    else:  # int4: half a byte per weight, bf16 scale and zero per 128 inputs
        per_layer = sum(o * k // 2 + 2 * 2 * o * (k // 128) for o, k in matrices)
    full = t.vocab_size * h + t.vision_vocab_size * h + layers * (4 * h + qkv) + h  # embed, head, norms, bias
    return layers * per_layer + 2 * full


def test_the_released_model_meets_the_size_targets():
    config = CheckpointConfig.from_dir(RELEASED)
    int8 = memory_report(RELEASED, "int8")["components"]
    int4 = memory_report(RELEASED, "ar=int4,dit=int8")["components"]
    assert int8["ar_text_decoder"]["bytes"] == _ar_bytes(config, "int8") <= 10 * 10**9  # 9.68e9
    assert int4["ar_text_decoder"]["bytes"] == _ar_bytes(config, "int4") <= 6 * 10**9  # 5.85e9
    # the DiT with its AdaLN modulation (0.76B parameters) kept in bf16: 7.82e9 bytes = 7.28 GiB,
    # so the 7.5 target holds in GiB, not in 10**9 bytes
    dit = int8["dit"]["bytes"]
    assert dit <= 7.5 * GIB and dit > 7.5e9
    plain = weight_bytes(RELEASED, "none", torch.bfloat16)
    assert plain["ar_text_decoder"]["params"] == int8["ar_text_decoder"]["params"] == 8_914_788_352
    assert (
        plain["ar_text_decoder"]["bytes"] == 2 * 8_914_788_352
        and plain["dit"]["bytes"] == 2 * plain["dit"]["params"]
    )


@pytest.mark.parametrize(
    ("quantize", "budget", "residency", "scheme"),
    [
        ("int8", "24GiB", "resident", "int8"),  # a 24 GB card (24 GiB); 24.6e9 bytes estimated
        ("int8", "16GB", "swap", "int8"),
        ("auto", "80GB", "resident", "none"),
        ("auto", "24GiB", "resident", "int8"),
        ("auto", "16GB", "swap", "int8"),
        # a 12 GB card: the DiT stage whole needs 15e9 at its peak (its 7.8e9 of weights, the VAE
        # decode's 5.4e9), so its blocks stream; the int8 AR (10.3e9 with its cache) runs whole
        ("int8", "12GB", "dit_offload", "int8"),
        ("auto", "12GB", "dit_offload", "int8"),
        ("auto", "8GB", "dit_offload", "ar=int4,dit=int8"),
    ],
)
def test_the_plan_for_1024_by_1024(quantize, budget, residency, scheme):
    report = memory_report(RELEASED, quantize, max_memory=budget)
    plan = report["plan"]
    assert (plan["residency"], plan["quantize"], plan["fits"]) == (residency, scheme, True)
    assert plan["peak_bytes"] <= parse_memory(budget) and report["quantize"] == scheme
    assert plan["peak_bytes"] == plan["estimate"]["peak_bytes"][residency]
    if budget == "12GB":
        assert plan["peak_bytes"] <= 11.5e9


def test_block_offload_keeps_two_blocks_of_a_streamed_stage():
    """The 12 GB plan's DiT stage, counted from the config alone: everything but 28 of the 30
    blocks, the VAE's decode (larger than a block's activations at 1024x1024) and the reserve."""
    e = estimate_memory(RELEASED, "int8", torch.bfloat16)
    count, unit = e.units["dit"]
    config = CheckpointConfig.from_dir(RELEASED).dit
    h = config.hidden_size
    # a block: qkv, out, FFN in/out in int8 (+ float32 scales), AdaLN (12 x h from the time
    # embedding) and the norms in bf16, biases in bf16
    ffn = 4 * h
    int8 = [(3 * h, h), (h, h), (ffn, h), (h, ffn)]
    assert count == config.num_layers == 30
    assert (
        unit >= sum(o * i + 4 * o for o, i in int8)
        and unit < 1.1 * sum(o * i + 4 * o for o, i in int8) + 12 * h * 512 * 2
    )
    _, dit_peak = e.stage_peaks("dit_offload")
    expected = e.dit_stage - 28 * unit + max(e.dit_activations, e.vae_activations)
    assert dit_peak == expected and e.peak("dit_offload") == max(e.stage_peaks("dit_offload")) + RESERVE


def test_image_to_image_counts_the_condition_kv():
    """One 1024x1024 condition image: its K/V in every DiT layer, 2 x 30 x 4096 x 4096 x 2 bytes
    (1.9 GiB), held through the whole denoise."""
    plain = estimate_memory(RELEASED, "int8", torch.bfloat16)
    edit = estimate_memory(RELEASED, "int8", torch.bfloat16, conditions=1)
    assert edit.parts["dit_condition_kv"] == 2 * 30 * 4096 * 4096 * 2
    assert edit.dit_activations - plain.dit_activations == edit.parts["dit_condition_kv"]
    assert "ar_vision" in edit.weights and edit.peak("swap") > plain.peak("swap")
    cached = estimate_memory(RELEASED, "int8", torch.bfloat16, step_cache=True)
    assert cached.parts["dit_step_cache"] == 4 * 2 * 4096 * 4096 * 2


def test_a_plan_that_cannot_fit_says_so(caplog):
    caplog.set_level("INFO", logger="glm_image.residency")
    plan = plan_memory(RELEASED, "meta", torch.bfloat16, quantize="none", max_memory="8GB")
    assert plan.residency == "offload" and not plan.fits and plan.offload and plan.streamed == ("ar", "dit")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "quantize none, offload" in line and "does NOT fit the max_memory (8.0 GB)" in line


def test_on_a_cpu_both_stages_stay(tiny_checkpoint):
    plan = plan_memory(tiny_checkpoint, "cpu", quantize="auto", height=512, width=512)
    assert plan.residency == "resident" and not plan.offload and str(plan.scheme) == "none"


@pytest.mark.parametrize("kind", ["none", "int8", "ar=int4,dit=int8"])
def test_the_estimated_weights_are_what_the_loader_builds(tiny_checkpoint, kind):
    from glm_image.engine import ArEngine, DitEngine

    def nbytes(module):
        return sum(t.numel() * t.element_size() for t in {id(p): p for p in module.parameters()}.values())

    ar = ArEngine.from_pretrained(tiny_checkpoint, quantize=kind)
    dit = DitEngine.from_pretrained(tiny_checkpoint, quantize=kind)
    estimate = weight_bytes(tiny_checkpoint, kind, torch.float32, vision=False)
    loaded = {
        "ar_text_decoder": nbytes(ar.model),
        "dit": nbytes(dit.model),
        "glyph_encoder": nbytes(dit.glyph.encoder),
        "vae": nbytes(dit.vae),
    }
    assert {name: c["bytes"] for name, c in estimate.items()} == loaded


_MEASURE = """
import json, sys, torch
from glm_image.bench.memory import PeakMemory
from glm_image.engine import ArEngine, DitEngine
root, kind = sys.argv[1], sys.argv[2]
with PeakMemory("cpu") as run, torch.inference_mode():
    ar = ArEngine.from_pretrained(root, quantize=kind)
    dit = DitEngine.from_pretrained(root, quantize=kind)
    ar.generate("a red car", 512, 512, seeds=[0], max_new_tokens=16)
    prior = torch.randint(0, 16384, (1, 1024), generator=torch.Generator().manual_seed(0))
    dit.decode(dit.denoise(prior, "a red car", 512, 512, num_inference_steps=2, seeds=0))
print(json.dumps({"increase": run.increase, "method": run.method}))
"""


def test_the_estimate_covers_what_a_generation_takes(tiny_checkpoint):
    """A fresh process loads both stages and generates a 512x512 image; its resident memory grows
    by less than the estimated peak (weights + the largest activation + the reserve), and by more
    than the estimated weights (the estimate counts what is really there). On tiny the libraries'
    own memory (imports, thread pools) is of the order of the reserve; ``benchmarks/bench_quant.py``
    compares each stage on the wide preset, where the weights and activations dominate."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MEASURE), str(tiny_checkpoint), "int8"],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    if "VmHWM" not in measured["method"]:
        pytest.skip("needs Linux's peak RSS")
    estimate = estimate_memory(tiny_checkpoint, "int8", torch.float32, height=512, width=512)
    assert sum(estimate.weights.values()) < measured["increase"] <= estimate.peak("resident")
    assert estimate.peak("resident") - RESERVE < 2 * measured["increase"]


@pytest.mark.parametrize("residency", ["resident", "swap", "dit_offload", "offload"])
def test_a_forced_residency_is_planned_and_said(residency):
    plan = memory_report(RELEASED, "int8", max_memory="12GB", residency=residency)["plan"]
    assert plan["residency"] == residency and f"residency {residency} as asked" in plan["reason"]
    assert plan["peak_bytes"] == plan["estimate"]["peak_bytes"][residency]
    assert plan["fits"] == (plan["peak_bytes"] <= 12e9)
