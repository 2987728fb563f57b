"""Where the engine runs: cpu | cuda | npu. The ONLY module that imports ``torch_npu``.

Detection order: the ``GLM_IMAGE_DEVICE`` environment variable (cpu, cuda or npu), then CUDA,
then Ascend (a guarded ``import torch_npu`` and ``torch.npu.is_available()``), then the CPU.
``torch_npu.contrib.transfer_to_npu`` is never used: it rewrites ``torch.cuda`` calls globally,
which would silently change what every other library in the process does.
"""

from __future__ import annotations

import enum
import functools
import importlib
import logging
import os
from types import ModuleType

import torch

from .errors import GlmImageError

__all__ = [
    "Platform",
    "default_dtype",
    "detect_platform",
    "npu_module",
    "resolve_device",
    "synchronize",
]

log = logging.getLogger(__name__)

ENV_VAR = "GLM_IMAGE_DEVICE"


class Platform(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"
    NPU = "npu"


ALLOWED = ", ".join(p.value for p in Platform)


@functools.cache
def npu_module() -> ModuleType | None:
    """``torch_npu`` if it imports (it needs the CANN toolkit), else None. Imported once."""
    try:
        return importlib.import_module("torch_npu")
    except Exception as e:  # ImportError, or CANN libraries missing (OSError, RuntimeError)
        log.debug("torch_npu is not usable: %s", e)
        return None


def _npu_available() -> bool:
    module = npu_module()
    if module is None:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def _available(platform: Platform) -> bool:
    if platform is Platform.CUDA:
        return torch.cuda.is_available()
    if platform is Platform.NPU:
        return _npu_available()
    return True


def detect_platform() -> Platform:
    """The platform to run on when the user names none (see the module docstring)."""
    override = os.environ.get(ENV_VAR, "").strip().lower()
    if override:
        try:
            platform = Platform(override)
        except ValueError:
            raise GlmImageError(f"{ENV_VAR} = {override!r} is not a device; allowed: {ALLOWED}") from None
        if not _available(platform):
            raise GlmImageError(f"{ENV_VAR} = {override!r} but no {override} device is available")
        return platform
    for platform in (Platform.CUDA, Platform.NPU):
        if _available(platform):
            return platform
    return Platform.CPU


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A ``torch.device`` the engine can run on; None: the detected platform.

    An unknown device type or one that is not available is an error naming the allowed values.
    """
    if device is None:
        return torch.device(detect_platform().value)
    text = str(device)
    try:
        platform = Platform(text.split(":", 1)[0])
    except ValueError:
        raise GlmImageError(f"device = {text!r} is not supported; allowed: {ALLOWED}") from None
    if not _available(platform):
        raise GlmImageError(f"device = {text!r}: no {platform.value} device is available here")
    return torch.device(text)


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on a CPU (exact, and bf16 GEMMs are slow there), bfloat16 on an accelerator."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), e.g. before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)
