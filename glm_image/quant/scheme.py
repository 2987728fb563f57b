"""``quantize=``: which weight format each stage loads in, parsed and checked before any weights load.

Spellings (``GlmImage.from_pretrained(quantize=...)``, ``--quantize``):

- ``none`` (default), ``int8``, ``fp8``: the same for both stages;
- ``int4``: both stages in int4, which is built for the AR only, so it is an error that says to
  write ``ar=int4,dit=int8`` (or ``dit=none`` / ``dit=fp8``);
- per stage, ``ar=int8,dit=fp8``: a stage not named stays unquantized;
- ``auto``: the memory planner picks (``glm_image.residency``), from the device's free memory or
  ``max_memory``.

Formats: ``int8`` weight-only per output channel (every device); ``fp8`` e4m3 weights per row
with dynamic per-token activation scales (CUDA GPUs with compute capability 8.9 or newer, where
the tensor cores multiply FP8); ``int4`` weight-only, group-wise (the AR; small cards).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GlmImageError

__all__ = ["FORMATS", "STAGE_FORMATS", "QuantScheme", "check_device", "parse_quantize"]

FORMATS = ("none", "int8", "fp8", "int4")
STAGE_FORMATS = {"ar": ("none", "int8", "fp8", "int4"), "dit": ("none", "int8", "fp8")}
_SPELLINGS = "none, int8, fp8, int4 (AR only), auto, or per stage such as 'ar=int8,dit=fp8'"
FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class QuantScheme:
    """The weight format of each stage ("none" = the checkpoint's precision), or ``auto``."""

    ar: str = "none"
    dit: str = "none"
    auto: bool = False

    def stage(self, name: str) -> str:
        """The format of stage ``name`` ("AR" or "DiT", any case)."""
        return self.ar if name.lower() == "ar" else self.dit

    def __str__(self) -> str:
        if self.auto:
            return "auto"
        if self.ar == self.dit:
            return self.ar
        return f"ar={self.ar},dit={self.dit}"


def parse_quantize(spec: str | QuantScheme | None, field: str = "quantize") -> QuantScheme:
    """``spec`` (see the module docstring) -> ``QuantScheme``; a ``GlmImageError`` naming
    ``field`` and the allowed values when it is not one."""
    if isinstance(spec, QuantScheme):
        return spec
    text = "none" if spec is None else str(spec).strip().lower()
    if text in ("", "none"):
        return QuantScheme()
    if text == "auto":
        return QuantScheme(auto=True)
    if "=" not in text:
        if text not in FORMATS:
            raise GlmImageError(f"{field} = {spec!r} is not known; allowed: {_SPELLINGS}")
        if text == "int4":
            raise GlmImageError(
                f"{field} = 'int4': int4 is built for the AR only (the DiT allows "
                f"{', '.join(STAGE_FORMATS['dit'])}); write 'ar=int4,dit=int8' or 'ar=int4'"
            )
        return QuantScheme(text, text)
    stages: dict[str, str] = {}
    for part in text.split(","):
        name, _, kind = (p.strip() for p in part.partition("="))
        if name not in STAGE_FORMATS:
            raise GlmImageError(
                f"{field} = {spec!r}: unknown stage {name!r}; allowed stages: ar, dit ({_SPELLINGS})"
            )
        if name in stages:
            raise GlmImageError(f"{field} = {spec!r}: stage {name!r} is given twice")
        if kind not in STAGE_FORMATS[name]:
            raise GlmImageError(
                f"{field} = {spec!r}: {name}={kind!r} is not built; allowed for {name}: "
                f"{', '.join(STAGE_FORMATS[name])}"
            )
        stages[name] = kind
    return QuantScheme(stages.get("ar", "none"), stages.get("dit", "none"))


def check_device(scheme: QuantScheme, device, field: str = "quantize") -> None:
    """Raise before any weights load when a format cannot run on ``device`` (fp8 needs a CUDA GPU
    of compute capability 8.9 or newer)."""
    import torch

    if "fp8" not in (scheme.ar, scheme.dit):
        return
    device = torch.device(device)
    allowed = "allowed here: none, int8, or ar=int4"
    if device.type != "cuda":
        raise GlmImageError(
            f"{field} = '{scheme}': fp8 needs a CUDA GPU with FP8 tensor cores (compute capability "
            f"8.9 or newer), not {device.type}; {allowed}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise GlmImageError(
            f"{field} = '{scheme}': fp8 needs compute capability 8.9 or newer; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; {allowed}"
        )
