"""What loading either stage starts with: the checkpoint folder, its configs, the device, the ops
backend and the weight format. One scaffold for ``ArEngine.from_pretrained`` and
``DitEngine.from_pretrained``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CheckpointConfig
from ..ops import Ops, select_ops
from ..quant import QuantScheme, check_device, linear_quantizers, parse_quantize

__all__ = ["StageSetup", "prepare_stage", "verify_ops"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSetup:
    root: Path
    config: CheckpointConfig
    device: torch.device
    ops: Ops
    quant: str = "none"  # this stage's weight format: none, int8, fp8, int4

    @property
    def quantize(self) -> Callable | None:
        """``load_model(quantize=...)`` for this stage's model (None: load as stored)."""
        return linear_quantizers(self.quant)


def prepare_stage(
    path: str | Path,
    device: str | torch.device,
    attention_backend: str | Ops | None,
    stage: str,
    quantize: str | QuantScheme | None = None,
) -> StageSetup:
    """Resolve ``path`` (a preset name, a folder or a hub id; see ``glm_image.hub``), read and
    validate its configs, and pick the ops backend for ``device`` unless the caller passes one
    already chosen (``GlmImage`` picks one for both stages). ``quantize``: see
    ``glm_image.quant.parse_quantize``; a format the device cannot run (fp8 off a recent CUDA GPU)
    or the stage does not have (int4 on the DiT) is an error here, before any weights load.
    ``auto`` must be resolved by the caller (``glm_image.residency.plan_memory``)."""
    from ..errors import GlmImageError
    from ..hub import resolve_checkpoint

    scheme = parse_quantize(quantize)
    if scheme.auto:
        raise GlmImageError(
            f"quantize = 'auto' is resolved by GlmImage.from_pretrained (the memory planner); "
            f"a single {stage} stage takes one of: none, int8, fp8"
            + (", int4" if stage.lower() == "ar" else "")
        )
    device = torch.device(device)
    # the device the stage runs on: a backend chosen by the caller serves it, even when the
    # stage is loaded elsewhere first (host memory, to take turns on a small GPU)
    runs_on = attention_backend.device if isinstance(attention_backend, Ops) else device
    check_device(scheme, runs_on)
    quant = scheme.stage(stage)
    if quant == "int4" and stage.lower() != "ar":
        raise GlmImageError(f"quantize: int4 is built for the AR only; the {stage} allows none, int8, fp8")
    if quant == "int4" and runs_on.type == "cpu":
        log.warning(
            "quantize: int4 has no CPU kernel (torch's wants a layout tied to the CPU's vector width): "
            "every int4 matmul dequantizes its weight first, ~40x slower than float32 decoding on a CPU. "
            "int4 is for small GPUs; on a CPU, int8 is the fast format"
        )
    root = resolve_checkpoint(path)
    config = CheckpointConfig.from_dir(root)
    if isinstance(attention_backend, Ops):
        ops = attention_backend
    else:
        ops = select_ops(attention_backend, device, stage=stage)
    return StageSetup(root, config, device, ops, quant)


def verify_ops(setup: StageSetup, model: torch.nn.Module) -> None:
    """Check the backend's kernels against the reference once for this (device, dtype), at the
    loaded model's sizes, before the first forward (``Ops.verify``; a no-op for ``sdpa`` and once
    done for a process), and its quantized matmuls for the stage's format (``Ops.verify_quant``).
    A kernel that fails is switched off with one warning."""
    from ..ops import CheckSizes

    dtype = next(model.parameters()).dtype
    sizes = CheckSizes.from_config(setup.config)
    setup.ops.verify(dtype, sizes)
    if setup.quant != "none":
        setup.ops.verify_quant(dtype, setup.quant, sizes)
