"""The flow-matching schedule and Euler step against GlmImagePipeline's scheduler code path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm_image.config import SchedulerConfig
from glm_image.sampling import euler_step, flow_schedule, guidance, image_seq_len
from glm_image.synthetic import preset_dir

CONFIG = SchedulerConfig.from_json(preset_dir("glm-image") / "scheduler" / "scheduler_config.json")


def _reference(num_steps: int, height: int, width: int):
    """What GlmImagePipeline.__call__ does before its denoising loop."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(preset_dir("glm-image") / "scheduler")
    seq_len = ((height // 8) * (width // 8)) // 4
    timesteps = np.linspace(1000, 1.0, num_steps + 1)[:-1].astype(np.int64).astype(np.float32)
    sigmas = timesteps / 1000
    mu = calculate_shift(seq_len, 256, 0.25, 0.75)
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, "cpu", timesteps, sigmas, mu=mu)
    return scheduler, timesteps, mu


@pytest.mark.parametrize(
    ("steps", "height", "width"), [(50, 1024, 1024), (28, 512, 512), (7, 1568, 1056), (1, 2048, 960)]
)
def test_timesteps_and_sigmas_are_bit_identical(steps, height, width):
    scheduler, timesteps, mu = _reference(steps, height, width)
    ours = flow_schedule(steps, image_seq_len(height, width), CONFIG)
    assert ours.mu == mu
    assert torch.equal(ours.timesteps, timesteps)
    assert torch.equal(ours.sigmas, scheduler.sigmas)
    assert ours.sigmas[-1] == 0 and len(ours.sigmas) == steps + 1


def test_euler_steps_match_the_scheduler():
    scheduler, timesteps, _ = _reference(6, 512, 512)
    ours = flow_schedule(6, image_seq_len(512, 512), CONFIG)
    g = torch.Generator().manual_seed(0)
    expected = latents = torch.randn(1, 16, 8, 8, generator=g)
    for i, t in enumerate(timesteps):
        velocity = torch.randn(1, 16, 8, 8, generator=g)
        expected = scheduler.step(velocity, t, expected, return_dict=False)[0]
        latents = euler_step(latents, velocity, ours.sigmas[i], ours.sigmas[i + 1])
        assert torch.equal(latents, expected)


def test_guidance_and_bad_steps():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert guidance(cond, uncond, 1.5).item() == 4.0
    assert guidance(cond, uncond, 1.0).item() == 3.0
    with pytest.raises(ValueError, match="num_inference_steps = 0"):
        flow_schedule(0, 256, CONFIG)
