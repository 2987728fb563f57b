"""The two stages apart: what crosses between them survives a trip to another process (pickle) and
gives the image the whole pipeline gives."""

from __future__ import annotations

import pickle

import numpy as np
from PIL import Image

from glm_image.stages import ar_stage, dit_stage


def test_the_stages_apart_equal_the_pipeline(glm):
    whole = glm.generate(["'A'", "「乙」"], 64, 96, num_inference_steps=2, seed=[4, 5])
    prior = ar_stage(glm.ar, ["'A'", "「乙」"], 64, 96, (4, 5))
    sent = pickle.loads(pickle.dumps(prior))  # what a queue or a Ray object ref carries
    images, timings = dit_stage(glm.dit, sent, 2, 1.5)
    assert set(timings) == {"dit", "vae"} and set(prior.timings) == {"ar", "ar_prefill"}
    assert (sent.prior_token_ids == whole.prior_token_ids).all()
    for ours, theirs in zip(images, whole.images, strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_image_to_image_conditions_cross_too(glm):
    condition = Image.new("RGB", (64, 64), (200, 30, 30))
    whole = glm.generate("make it blue", 64, 64, num_inference_steps=1, seed=9, images=[condition])
    prior = ar_stage(glm.ar, ["make it blue"], 64, 64, (9,), condition_images=[[condition]])
    sent = pickle.loads(pickle.dumps(prior))
    assert len(sent.conditions) == 1 and len(sent.conditions[0]) == 1
    images, _ = dit_stage(glm.dit, sent, 1, 1.5)
    assert np.array_equal(np.asarray(images[0]), np.asarray(whole.images[0]))
