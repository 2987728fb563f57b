"""The flow-matching schedule and Euler step against what GlmImagePipeline itself computes."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from glm_image.config import SchedulerConfig
from glm_image.sampling import euler_step, flow_schedule, guidance, image_seq_len
from glm_image.synthetic import preset_dir

CONFIG = SchedulerConfig.from_json(preset_dir("glm-image") / "scheduler" / "scheduler_config.json")


class _Captured(Exception):
    pass


def _reference(pipeline, num_steps: int, height: int, width: int):
    """The scheduler, timesteps and ``mu`` GlmImagePipeline.__call__ itself computes before its
    denoising loop: its call to ``retrieve_timesteps`` is recorded, then the call is stopped."""
    from diffusers.pipelines.glm_image import pipeline_glm_image

    seen = {}
    original = pipeline_glm_image.retrieve_timesteps

    def spy(scheduler, *args, **kwargs):
        timesteps, _ = original(scheduler, *args, **kwargs)
        seen.update(scheduler=scheduler, timesteps=timesteps, mu=kwargs["mu"])
        raise _Captured

    prior = torch.zeros((1, (height // 16) * (width // 16)), dtype=torch.long)
    pipeline_glm_image.retrieve_timesteps = spy
    try:
        with pytest.raises(_Captured):
            pipeline("x", height=height, width=width, num_inference_steps=num_steps, prior_token_ids=prior)
    finally:
        pipeline_glm_image.retrieve_timesteps = original
    return seen["scheduler"], seen["timesteps"], seen["mu"]


def test_the_tiny_scheduler_is_the_released_one(reference_pipeline):
    """So the tiny pipeline's schedule is the released model's."""
    released = FlowMatchEulerDiscreteScheduler.from_pretrained(preset_dir("glm-image") / "scheduler").config

    def settings(config) -> dict:
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    assert settings(reference_pipeline.scheduler.config) == settings(released)


@pytest.mark.parametrize(
    ("steps", "height", "width"), [(50, 1024, 1024), (28, 512, 512), (7, 1568, 1056), (1, 2048, 960)]
)
def test_timesteps_and_sigmas_are_bit_identical(reference_pipeline, steps, height, width):
    scheduler, timesteps, mu = _reference(reference_pipeline, steps, height, width)
    ours = flow_schedule(steps, image_seq_len(height, width), CONFIG)
    assert ours.mu == mu
    assert torch.equal(ours.timesteps, timesteps)
    assert torch.equal(ours.sigmas, scheduler.sigmas)
    assert ours.sigmas[-1] == 0 and len(ours.sigmas) == steps + 1


def test_euler_steps_match_the_scheduler(reference_pipeline):
    scheduler, timesteps, _ = _reference(reference_pipeline, 6, 512, 512)
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
