"""The reference libraries' classes for each weighted component, built from a config folder.

Used to write synthetic checkpoints, to count parameters at the released size on the ``meta``
device (no memory), and as the oracle our loader and models are compared against.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..weights import build_on_meta

__all__ = ["REFERENCE_FACTORIES", "build_reference", "count_parameters"]


def _vision_language_encoder(cfg: Path) -> torch.nn.Module:
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    return GlmImageForConditionalGeneration(GlmImageConfig.from_pretrained(cfg))


def _transformer(cfg: Path) -> torch.nn.Module:
    from diffusers import GlmImageTransformer2DModel

    return GlmImageTransformer2DModel.from_config(GlmImageTransformer2DModel.load_config(cfg))


def _text_encoder(cfg: Path) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config.from_pretrained(cfg))


def _vae(cfg: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(AutoencoderKL.load_config(cfg))


# component folder -> factory(config folder) for the components that carry weights
REFERENCE_FACTORIES: dict[str, Callable[[Path], torch.nn.Module]] = {
    "vision_language_encoder": _vision_language_encoder,
    "transformer": _transformer,
    "text_encoder": _text_encoder,
    "vae": _vae,
}


def build_reference(root: str | Path, component: str, *, meta: bool = False) -> torch.nn.Module:
    """The reference module of ``component`` from ``root/component``; on ``meta`` if asked."""
    factory = REFERENCE_FACTORIES[component]
    folder = Path(root) / component
    return build_on_meta(lambda: factory(folder)) if meta else factory(folder)


def count_parameters(module: torch.nn.Module, prefix: str = "") -> int:
    """Distinct parameters (tied weights once) whose name starts with ``prefix``."""
    return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefix))
