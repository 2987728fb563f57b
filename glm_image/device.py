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

    An unknown device type, a malformed index, or a device that is not here is a ``GlmImageError``
    starting with "device = " that says why and names the allowed values (the CLI says ``--device``).
    """
    if device is None:
        return torch.device(detect_platform().value)
    text = str(device)
    kind, _, index = text.partition(":")
    try:
        platform = Platform(kind)
    except ValueError:
        raise GlmImageError(f"device = {text!r} is not supported; allowed: {ALLOWED}") from None
    if not _available(platform):
        raise GlmImageError(
            f"device = {text!r}: no {platform.value} device is available here ({_why_not(platform)}); "
            f"allowed here: {', '.join(p.value for p in Platform if _available(p))}"
        )
    try:
        resolved = torch.device(text)
    except RuntimeError:  # "cuda:x", "cuda:-1", "cpu:0:1": torch's own message lists its device types
        raise GlmImageError(
            f"device = {text!r} is not a device; allowed: {ALLOWED}, with an index such as {platform.value}:0"
        ) from None
    count = _count(platform)
    if index and resolved.index is not None and count is not None and resolved.index >= count:
        raise GlmImageError(
            f"device = {text!r}: there are {count} {platform.value} devices here; "
            f"allowed: {platform.value}:0 .. {platform.value}:{count - 1}"
        )
    return resolved


def _why_not(platform: Platform) -> str:
    """Why ``platform`` is not available, in words a user can act on."""
    if platform is Platform.CUDA:
        if torch.version.cuda is None:
            return f"this torch build, {torch.__version__}, has no CUDA support"
        return "no CUDA GPU is visible: check the driver and CUDA_VISIBLE_DEVICES"
    if npu_module() is None:
        return "torch_npu is not installed, or does not import without the Ascend CANN toolkit"
    return "torch_npu imports but sees no NPU: check the driver and ASCEND_RT_VISIBLE_DEVICES"


def _count(platform: Platform) -> int | None:
    """Devices of ``platform`` here; None where an index is not counted (the CPU)."""
    if platform is Platform.CUDA:
        return torch.cuda.device_count()
    count = getattr(getattr(torch, "npu", None), "device_count", None)
    return int(count()) if platform is Platform.NPU and callable(count) else None


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on a CPU (exact, and bf16 GEMMs are slow there), bfloat16 on an accelerator."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), e.g. before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)
