"""The hardware-floor model, the peak-memory probe and the shared report layout."""

from __future__ import annotations

import json
import mmap
import time

import numpy as np
import pytest
import torch
from torch import nn

from glm_image.bench.memory import PeakMemory
from glm_image.bench.report import SCHEMA, build_report, markdown_table, parse_sizes, ratio, save_report
from glm_image.bench.roofline import (
    DEVICES,
    ar_weight_bytes_per_token,
    dit_flops_per_step,
    find_device,
    floor_fractions,
    fraction,
)
from glm_image.config import CheckpointConfig
from glm_image.errors import GlmImageError
from glm_image.synthetic import preset_dir


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
        ("NVIDIA H200", "NVIDIA H200"),
        ("NVIDIA H200 NVL", "NVIDIA H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB PCIe"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
        ("Ascend910B3", "Huawei Ascend 910B"),
        ("NVIDIA GH200 480GB", None),  # not an H200
        ("Tesla T4", None),
    ],
)
def test_device_names_match_the_table(name, expected):
    spec = find_device(name)
    assert (spec.name if spec else None) == expected


def test_every_device_states_its_source():
    assert all(spec.source and spec.memory_bytes_per_s > 0 and spec.dense_flops > 0 for spec in DEVICES)


def test_released_ar_reads_its_weights_but_the_embedding_table_per_token():
    config = CheckpointConfig.from_dir(preset_dir("glm-image"))
    from glm_image.models.ar import ArModel

    with torch.device("meta"):
        model = ArModel(config.ar.text).to(torch.bfloat16)
    total = sum(p.numel() for p in model.parameters()) * 2
    table = config.ar.text.vocab_size * config.ar.text.hidden_size * 2
    per_token = ar_weight_bytes_per_token(model)
    assert per_token == total - table + config.ar.text.hidden_size * 2
    assert 16.4e9 < per_token < 16.5e9  # 8.91B parameters less the 688M-row table, in bf16


def test_weight_bytes_of_a_toy_model():
    model = nn.Module()
    model.embed_tokens = nn.Embedding(10, 4)  # 160 bytes, one row 16
    model.proj = nn.Linear(4, 4, bias=False)  # 64 bytes
    assert ar_weight_bytes_per_token(model) == 64 + 16


def test_dit_flops_scale_with_branches_and_images():
    config = CheckpointConfig.from_dir(preset_dir("glm-image")).dit
    one = dit_flops_per_step(config, 4096, 16, branches=1)
    assert dit_flops_per_step(config, 4096, 16) == 2 * one
    assert dit_flops_per_step(config, 4096, 16, images=4) == 8 * one
    assert 100e12 < dit_flops_per_step(config, 4096, 16) < 130e12  # one CFG step at 1024x1024


def test_floor_only_on_known_accelerators():
    cpu = floor_fractions(torch.device("cpu"), "cpu", torch.float32, ar_bytes_per_step=1, dit_flops=1)
    assert cpu["device"] is None and "GPUs and NPUs only" in cpu["reason"]
    unknown = floor_fractions(
        torch.device("cuda"), "Tesla T4", torch.bfloat16, ar_bytes_per_step=1, dit_flops=1
    )
    assert unknown["device"] is None and "not in the device table" in unknown["reason"]
    h100 = floor_fractions(
        torch.device("cuda"),
        "NVIDIA H100 80GB HBM3",
        torch.bfloat16,
        ar_bytes_per_step=3.35e9,
        dit_flops=989.5e12,
    )
    assert h100["ar_seconds_per_step"] == pytest.approx(1e-3) and h100[
        "dit_seconds_per_step"
    ] == pytest.approx(1)
    fp32 = floor_fractions(
        torch.device("cuda"), "NVIDIA H100 80GB HBM3", torch.float32, ar_bytes_per_step=1, dit_flops=1
    )
    assert fp32["dit_seconds_per_step"] is None and "bf16/fp16" in fp32["dit_reason"]
    assert fraction(1e-3, 4e-3) == 0.25 and fraction(None, 1.0) is None


@pytest.mark.parametrize("use_proc", [True, False])
def test_peak_memory_sees_a_transient_allocation(use_proc):
    with PeakMemory("cpu", use_proc=use_proc) as memory:
        # fresh pages from the kernel (malloc could reuse memory that is resident already)
        block = mmap.mmap(-1, 200 * 2**20)
        np.frombuffer(block, dtype=np.uint8)[:] = 1  # touched: resident
        time.sleep(0.05)  # held long enough for the 5 ms sampler to see it (on a quiet machine)
        deadline = time.monotonic() + 30  # a loaded one may starve the sampler's thread: wait for it
        while not use_proc and memory.peak - memory.start <= 150 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.005)
        block.close()
    assert memory.increase > 150 * 2**20, (memory.method, memory.start, memory.peak)
    assert ("VmHWM" in memory.method) if use_proc else ("psutil" in memory.method)


def test_ratios_keep_three_significant_digits():
    # a kernel 4000x faster than its baseline (an interpreted kernel on a CPU dry run) is not 0
    assert ratio(0.5, 2000.0) == 0.00025
    assert ratio(2.0, 3.0) == 0.667 and ratio(3000.0, 7.0) == 429.0
    assert ratio(1.0, 0.0) is None and ratio(1.0, None) is None


def test_report_layout(tmp_path):
    report = build_report(
        "kernels", [{"name": "rms_norm", "seconds": 1e-4}], config={"dtype": "bf16"}, notes=["n"]
    )
    assert report["schema"] == SCHEMA and report["benchmark"] == "kernels"
    assert set(report) == {"schema", "benchmark", "created", "machine", "config", "results", "notes"}
    assert {"device", "threads", "torch", "python", "glm_image"} <= set(report["machine"])
    path = save_report(report, tmp_path / "r" / "k.json")
    assert json.loads(path.read_text())["results"][0]["name"] == "rms_norm"
    assert markdown_table(["a", "b"], [[1, None], ["x|y", 2]]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| 1 | — |",
        "| x\\|y | 2 |",
    ]
    assert parse_sizes("512x512, 1024x768") == [(512, 512), (1024, 768)]
    with pytest.raises(GlmImageError, match="expected WIDTHxHEIGHT"):
        parse_sizes("big")
