"""Flow-matching schedule, Euler step and guidance for the DiT, as pure functions.

The schedule is GlmImagePipeline's, computed the same way (NumPy float32, the same operations in
the same order), so timesteps and sigmas are bit-identical to the reference:

    timesteps = int(linspace(1000, 1, N + 1)[:-1])           unshifted; the DiT sees t - 1
    mu        = sqrt(seq_len / 256) * 0.75 + 0.25             seq_len = DiT image tokens
    sigmas    = mu / (mu + (1 / (t / 1000) - 1))              "linear" time shift, then a final 0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import SchedulerConfig

__all__ = ["FlowSchedule", "euler_step", "flow_schedule", "guidance", "image_seq_len", "resolution_shift"]


@dataclass(frozen=True)
class FlowSchedule:
    timesteps: torch.Tensor  # (N,) float32, unshifted
    sigmas: torch.Tensor  # (N + 1,) float32, shifted, ending in 0
    mu: float


def image_seq_len(height: int, width: int, vae_scale: int = 8, patch: int = 2) -> int:
    """DiT image tokens for an image of ``height`` x ``width`` pixels."""
    return ((height // vae_scale) * (width // vae_scale)) // (patch * patch)


def resolution_shift(seq_len: int, config: SchedulerConfig) -> float:
    """``mu`` of the dynamic shift: grows with the square root of the image's token count."""
    return (seq_len / config.base_image_seq_len) ** 0.5 * config.max_shift + config.base_shift


def flow_schedule(num_steps: int, seq_len: int, config: SchedulerConfig) -> FlowSchedule:
    if num_steps < 1:
        raise ValueError(f"num_inference_steps = {num_steps} must be >= 1")
    steps = config.num_train_timesteps
    timesteps = np.linspace(steps, 1.0, num_steps + 1)[:-1].astype(np.int64).astype(np.float32)
    sigmas = (timesteps / steps).astype(np.float32)
    mu = resolution_shift(seq_len, config)
    if not config.use_dynamic_shifting:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    elif config.time_shift_type == "linear":
        sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = np.exp(mu) / (np.exp(mu) + (1 / sigmas - 1) ** 1.0)
    sigmas = torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])
    return FlowSchedule(torch.from_numpy(timesteps), sigmas, mu)


def euler_step(
    latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One Euler step in float32, cast back to the velocity's dtype (as the reference scheduler)."""
    return (latents.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


def guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)
