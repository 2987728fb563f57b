"""The two stages apart: what crosses between them survives a trip to another process (pickle) and
gives the image the whole pipeline gives."""

from __future__ import annotations

import pickle

import numpy as np
from PIL import Image

from glm_image.stages import ArCall, DitCall, ar_stage, dit_stage


def test_the_stages_apart_equal_the_pipeline(glm):
    whole = glm.generate(["'A'", "「乙」"], 64, 96, num_inference_steps=2, seed=[4, 5])
    prior = ar_stage(glm.ar, ArCall(("'A'", "「乙」"), 64, 96, (4, 5)))
    sent = pickle.loads(pickle.dumps(prior))  # what a queue or a Ray object ref carries
    made = dit_stage(glm.dit, DitCall(sent, 2, 1.5))
    images = made.images
    assert set(made.timings) == {"dit", "vae"} and set(prior.timings) == {"ar", "ar_prefill"}
    assert made.dit_forwards == (4.0, 4.0)  # two passes (the CFG branches) per step
    assert (sent.prior_token_ids == whole.prior_token_ids).all()
    for ours, theirs in zip(images, whole.images, strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_image_to_image_conditions_cross_too(glm):
    condition = Image.new("RGB", (64, 64), (200, 30, 30))
    whole = glm.generate("make it blue", 64, 64, num_inference_steps=1, seed=9, images=[condition])
    prior = ar_stage(glm.ar, ArCall(("make it blue",), 64, 64, (9,), condition_images=[[condition]]))
    sent = pickle.loads(pickle.dumps(prior))
    assert len(sent.conditions) == 1 and len(sent.conditions[0]) == 1
    images = dit_stage(glm.dit, DitCall(sent, 1, 1.5)).images
    assert np.array_equal(np.asarray(images[0]), np.asarray(whole.images[0]))
