"""The hardware floor: how fast a stage could possibly run on a device, from a roofline model.

- AR decode is memory-bound: every step reads the decoder's weights once (the KV cache and the
  activations are small beside 9B parameters), so one step can take no less than
  ``weight bytes read per step / memory bandwidth``, whatever the batch.
- The DiT is compute-bound: one CFG step can take no less than ``FLOPs per step / peak dense
  FLOP/s``.

``fraction_of_floor`` = floor time / measured time: 1.0 would be the hardware's limit. The figures
are vendor peaks (dense, bf16/fp16 tensor cores), which no real kernel reaches; they bound, they
do not predict. Unknown devices get no fraction (None, with the reason) rather than a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DitConfig

__all__ = [
    "DEVICES",
    "DeviceSpec",
    "ar_weight_bytes_per_token",
    "dit_flops_per_step",
    "find_device",
    "floor_fractions",
    "fraction",
]


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    match: tuple[str, ...]  # each must start a word of the normalised device name
    memory_bytes_per_s: float  # HBM bandwidth
    dense_flops: float  # bf16/fp16 tensor-core peak, dense (datasheets often print it "with sparsity", x2)
    source: str
    approximate: bool = False  # no vendor datasheet with the figures: a commonly reported value


TB, TFLOP = 1e12, 1e12

# Most specific first: find_device takes the first entry whose substrings all occur.
DEVICES: tuple[DeviceSpec, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h100/):
    # SXM 3.35 TB/s, BF16 1,979 TFLOPS with sparsity; PCIe 2 TB/s, 1,513; NVL 3.9 TB/s, 1,671.
    DeviceSpec(
        "NVIDIA H100 NVL", ("h100", "nvl"), 3.9 * TB, 835.5 * TFLOP, "NVIDIA H100 datasheet (NVL column)"
    ),
    DeviceSpec(
        "NVIDIA H100 PCIe", ("h100", "pcie"), 2.0 * TB, 756.5 * TFLOP, "NVIDIA H100 datasheet (PCIe column)"
    ),
    DeviceSpec(
        "NVIDIA H100 SXM", ("h100", "hbm3"), 3.35 * TB, 989.5 * TFLOP, "NVIDIA H100 datasheet (SXM column)"
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h200/):
    # SXM 4.8 TB/s, BF16 1,979 TFLOPS with sparsity; NVL 4.8 TB/s, 1,671 with sparsity.
    DeviceSpec(
        "NVIDIA H200 NVL", ("h200", "nvl"), 4.8 * TB, 835.5 * TFLOP, "NVIDIA H200 datasheet (NVL column)"
    ),
    DeviceSpec("NVIDIA H200", ("h200",), 4.8 * TB, 989.5 * TFLOP, "NVIDIA H200 datasheet (SXM column)"),
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf):
    # BF16 312 TFLOPS dense on every variant; 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s.
    DeviceSpec(
        "NVIDIA A100 80GB SXM", ("a100", "sxm", "80gb"), 2.039 * TB, 312 * TFLOP, "NVIDIA A100 datasheet"
    ),
    DeviceSpec(
        "NVIDIA A100 80GB PCIe", ("a100", "80gb", "pcie"), 1.935 * TB, 312 * TFLOP, "NVIDIA A100 datasheet"
    ),
    DeviceSpec("NVIDIA A100 40GB", ("a100", "40gb"), 1.555 * TB, 312 * TFLOP, "NVIDIA A100 datasheet"),
    # Huawei publishes no per-chip datasheet for the Ascend 910B; 64 GB HBM2e at ~1.6 TB/s and
    # ~320 TFLOPS FP16 are the figures commonly reported for the Atlas 800T A2 (910B3) module,
    # and other reports differ (280-376 TFLOPS), so the fraction is marked approximate.
    DeviceSpec(
        "Huawei Ascend 910B",
        ("ascend910b",),
        1.6 * TB,
        320 * TFLOP,
        "commonly reported Atlas 800T A2 figures (no vendor datasheet)",
        approximate=True,
    ),
)


def _normalise(name: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'nvidia a100 sxm4 80gb'; 'Ascend910B3' -> 'ascend910b3'."""
    return re.sub(r"[-_\s]+", " ", name.lower()).strip()


def find_device(name: str) -> DeviceSpec | None:
    """The table entry for a device name as ``torch.cuda.get_device_name()`` gives it, or None."""
    normalised = _normalise(name)

    def has(part: str) -> bool:  # at the start of a word: "h200" must not match "gh200"
        return re.search(rf"(?<![a-z0-9]){re.escape(part)}", normalised) is not None

    return next((spec for spec in DEVICES if all(has(part) for part in spec.match)), None)


def ar_weight_bytes_per_token(model: nn.Module, embedding: nn.Module | None = None) -> int:
    """Bytes of weights one AR decode step reads: every parameter but the embedding table, plus
    the one embedding row the step looks up (``embedding``: default ``model.embed_tokens``)."""
    table = (embedding if embedding is not None else model.embed_tokens).weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - table.numel() * table.element_size() + table.shape[1] * table.element_size()


def dit_flops_per_step(
    config: DitConfig, image_tokens: int, text_tokens: int, branches: int = 2, images: int = 1
) -> float:
    """FLOPs (2 per multiply-add) of one denoising step: every linear layer and the attention
    products of every block, for both CFG branches of ``images`` images."""
    d, s = config.hidden_size, image_tokens + text_tokens
    per_layer = s * (4 * d * d + 2 * 4 * d * d) + 2 * s * s * d  # qkv + out, FFN x4, QK^T and PV
    blocks = config.num_layers * per_layer
    inputs = image_tokens * (config.in_channels * config.patch_size**2 * d + 2 * d * d)  # patch + prior
    glyph = text_tokens * (config.text_embed_dim * d + d * d)
    output = image_tokens * d * config.patch_size**2 * config.out_channels
    return 2.0 * branches * images * (blocks + inputs + glyph + output)


def floor_fractions(
    device: torch.device,
    name: str,
    dtype: torch.dtype,
    *,
    ar_bytes_per_step: int,
    dit_flops: float,
) -> dict:
    """The floor of each stage on this device: ``{"device", "source", "ar_seconds_per_step",
    "dit_seconds_per_step", ...}``, or ``{"device": None, "reason": ...}`` when there is none.
    A measurement's fraction is then ``floor / measured`` (``fraction``)."""
    if device.type not in ("cuda", "npu"):
        return {
            "device": None,
            "reason": f"the floor is reported on GPUs and NPUs only (device {device.type})",
        }
    spec = find_device(name)
    if spec is None:
        return {
            "device": None,
            "reason": f"{name!r} is not in the device table (glm_image/bench/roofline.py)",
        }
    floor = {
        "device": spec.name,
        "source": spec.source,
        "approximate": spec.approximate,
        "memory_bytes_per_s": spec.memory_bytes_per_s,
        "dense_flops": spec.dense_flops,
        "ar_seconds_per_step": ar_bytes_per_step / spec.memory_bytes_per_s,
    }
    if dtype in (torch.bfloat16, torch.float16):
        floor["dit_seconds_per_step"] = dit_flops / spec.dense_flops
    else:
        floor["dit_seconds_per_step"] = None
        floor["dit_reason"] = (
            f"the table holds bf16/fp16 peaks; this run is {str(dtype).removeprefix('torch.')}"
        )
    return floor


def fraction(floor_seconds: float | None, measured_seconds: float | None) -> float | None:
    """floor / measured, or None when either is unknown."""
    if not floor_seconds or not measured_seconds:
        return None
    return floor_seconds / measured_seconds
