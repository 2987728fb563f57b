"""Adapters made by PEFT itself on the tiny checkpoint's reference models, with random B.

PEFT starts every B at zero (the adapter is then the identity), which would let any loader pass:
both A and B are redrawn here from a seed, so an adapter changes the outputs visibly."""

from __future__ import annotations

from pathlib import Path

import torch

AR_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_up_proj|down_proj)"
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def randomise(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * std)


def set_scale(model: torch.nn.Module, scale: float) -> None:
    """PEFT's own user scale: scaling = scale * lora_alpha / r in every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", scale)


def peft_ar(checkpoint: Path, out: Path, seed: int = 1, **config):
    """transformers' AR wrapped by PEFT (random A, B), saved to ``out``; returns the wrapped model."""
    from peft import LoraConfig, get_peft_model
    from transformers import GlmImageForConditionalGeneration

    base = GlmImageForConditionalGeneration.from_pretrained(checkpoint / "vision_language_encoder").eval()
    config = {"r": 4, "lora_alpha": 8, "target_modules": AR_TARGETS, **config}
    model = get_peft_model(base, LoraConfig(**config))
    randomise(model, seed)
    model.save_pretrained(out)
    return model.eval()


def peft_dit(checkpoint: Path, out: Path, seed: int = 2, **config):
    """diffusers' DiT wrapped by PEFT (random A, B), saved to ``out``; returns the wrapped model."""
    from diffusers import GlmImageTransformer2DModel
    from peft import LoraConfig, get_peft_model

    base = GlmImageTransformer2DModel.from_pretrained(checkpoint / "transformer").eval()
    config = {"r": 4, "lora_alpha": 4, "target_modules": DIT_TARGETS, **config}
    model = get_peft_model(base, LoraConfig(**config))
    randomise(model, seed)
    model.save_pretrained(out)
    return model.eval()
