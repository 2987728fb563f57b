"""What loading either stage starts with: the checkpoint folder, its configs, the device and the
ops backend. One scaffold for ``ArEngine.from_pretrained`` and ``DitEngine.from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CheckpointConfig
from ..ops import Ops, select_ops

__all__ = ["StageSetup", "prepare_stage", "verify_ops"]


@dataclass(frozen=True)
class StageSetup:
    root: Path
    config: CheckpointConfig
    device: torch.device
    ops: Ops


def prepare_stage(
    path: str | Path, device: str | torch.device, attention_backend: str | Ops | None, stage: str
) -> StageSetup:
    """Resolve ``path`` (a preset name, a folder or a hub id; see ``glm_image.hub``), read and
    validate its configs, and pick the ops backend for ``device`` unless the caller passes one
    already chosen (``GlmImage`` picks one for both stages)."""
    from ..hub import resolve_checkpoint

    root = resolve_checkpoint(path)
    config = CheckpointConfig.from_dir(root)
    device = torch.device(device)
    if isinstance(attention_backend, Ops):
        ops = attention_backend
    else:
        ops = select_ops(attention_backend, device, stage=stage)
    return StageSetup(root, config, device, ops)


def verify_ops(setup: StageSetup, model: torch.nn.Module) -> None:
    """Check the backend's kernels against the reference once for this (device, dtype), at the
    loaded model's sizes, before the first forward (``Ops.verify``; a no-op for ``sdpa`` and once
    done for a process). A kernel that fails is switched off with one warning."""
    from ..ops import CheckSizes

    setup.ops.verify(next(model.parameters()).dtype, CheckSizes.from_config(setup.config))
