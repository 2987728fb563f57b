"""The backend registry: which op backends exist, which can serve a device, and the choice.

A backend is chosen once per engine (``select_ops``) and logged once. ``auto`` takes the first
usable backend in the device's preference order; a backend asked for by name that cannot serve
the device is an error that says why (never a silent swap). Within a chosen backend, a single
call whose shape or dtype the backend does not handle falls back to ``sdpa`` with a stated reason
(see ``Ops.fallback``).

Backends import lazily: ``triton`` needs the ``cuda`` extra, ``npu`` needs torch_npu (through
``glm_image.device``, the only module that imports it). ``check_backend`` lives here, beside the
choice it checks: the registry is the top of ``ops`` (registry -> backends -> ``torch_ops`` ->
``selfcheck``), so nothing below it imports it back.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import GlmImageError

if TYPE_CHECKING:  # this module imports torch only when a backend is chosen (`--help` stays light)
    import torch

    from .selfcheck import CheckRow, CheckSizes
    from .torch_ops import Ops

__all__ = ["BACKENDS", "BackendSpec", "available_backends", "check_backend", "select_ops"]

log = logging.getLogger("glm_image.ops")


def _triton_unusable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'glm-image[cuda]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's interpreter runs the kernels on CPU tensors (tests)
    return f"Triton kernels run on CUDA devices, not {device.type}"


def _npu_unusable(device: torch.device) -> str | None:
    from ..device import npu_module

    if device.type != "npu":
        return f"the npu backend serves Ascend NPUs, not {device.type}"
    if npu_module() is None:
        return "torch_npu is not importable (needs the CANN toolkit; pip install 'glm-image[npu]')"
    return None


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class", imported only when chosen
    about: str
    unusable: Callable[[torch.device], str | None]  # why it cannot serve a device, or None

    def load(self, device: torch.device) -> Ops:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)(device)


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            "sdpa",
            "glm_image.ops.torch_ops:TorchOps",
            "torch scaled_dot_product_attention and plain torch (the reference)",
            lambda device: None,
        ),
        BackendSpec(
            "triton",
            "glm_image.ops.triton_ops:TritonOps",
            "our Triton kernels (decode attention, fused norms and rotary) + torch SDPA for prefill",
            _triton_unusable,
        ),
        BackendSpec(
            "npu",
            "glm_image.ops.npu_ops:NpuOps",
            "torch_npu fused operators (npu_fused_infer_attention_score, npu_rms_norm, ...)",
            _npu_unusable,
        ),
    )
}

# ``auto``: the first usable backend, by device type
PREFERENCE = {"cuda": ("triton", "sdpa"), "npu": ("npu", "sdpa"), "cpu": ("sdpa",)}

CHOICES = ("auto", *BACKENDS)


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """Every registered backend -> None if it can serve ``device``, else the reason it cannot."""
    import torch

    device = torch.device(device)
    return {name: spec.unusable(device) for name, spec in BACKENDS.items()}


def select_ops(name: str | None, device: torch.device | str, *, stage: str = "") -> Ops:
    """The backend ``name`` (or ``auto``/None: the best usable one) for ``device``; logged once."""
    import torch

    device = torch.device(device)
    name = (name or "auto").lower()
    if name not in CHOICES:
        raise GlmImageError(f"attention_backend = {name!r} is not known; allowed: {', '.join(CHOICES)}")
    if name == "auto":
        for candidate in PREFERENCE.get(device.type, ("sdpa",)):
            if BACKENDS[candidate].unusable(device) is None:
                name = candidate
                break
        why = "auto"
    else:
        reason = BACKENDS[name].unusable(device)
        if reason is not None:
            raise GlmImageError(f"attention_backend = {name!r} cannot run on {device}: {reason}")
        why = "asked for"
    ops = BACKENDS[name].load(device)
    log.info(
        "%sops backend: %s on %s (%s): %s",
        f"{stage} " if stage else "",
        name,
        device,
        why,
        BACKENDS[name].about,
    )
    return ops


def check_backend(
    name: str, device: torch.device | str, dtype: torch.dtype, sizes: CheckSizes | None = None
) -> list[CheckRow]:
    """The self-check of backend ``name`` (``auto`` allowed) for ``device`` and ``dtype``: its
    rows (none for ``sdpa``, the reference; ``selfcheck.format_check`` prints them). Raises
    ``GlmImageError`` when the backend cannot serve the device, as ``select_ops`` does."""
    return select_ops(name, device).verify(dtype, sizes)
