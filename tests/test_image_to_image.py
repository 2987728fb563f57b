"""Image-to-image against the reference, stage by stage and end to end.

diffusers 0.42's GlmImagePipeline cannot tokenize condition images with transformers 5.x (it
concatenates the per-image features before `get_image_tokens`, which then iterates over
channels), so its own AR step fails. The AR stage is therefore compared with transformers'
`generate` (which tokenizes the images itself, correctly), and the DiT stage with the pipeline
given the same prior tokens, condition codes and grids through `prior_token_ids=`,
`prior_token_image_ids=` and `source_image_grid_thw=`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from glm_image.engine.protocol import upsample_grid
from glm_image.errors import GlmImageError

PROMPT = "make the sign say 'BLUE'"
HEIGHT, WIDTH = 128, 96


def _image(height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


CONDITIONS = {1: [_image(96, 128, 0)], 2: [_image(96, 128, 0), _image(64, 64, 1)]}


@pytest.mark.parametrize("count", [1, 2])
def test_ar_tokens_equal_transformers_generate(glm, reference_pipeline, count):
    images = CONDITIONS[count]
    inputs = glm.ar.processor_inputs(PROMPT, HEIGHT, WIDTH, images)
    target = int(inputs["image_grid_thw"][-1].prod())
    torch.manual_seed(4)
    with torch.no_grad():
        expected = reference_pipeline.vision_language_encoder.generate(
            **inputs, max_new_tokens=target + 1, do_sample=True
        )
    expected = expected[0, inputs["input_ids"].shape[1] :]
    ours = glm.ar.generate(
        PROMPT, HEIGHT, WIDTH, images=[images], seeds=[4], constrain_grid=False, include_eos=True
    )
    assert ours.spec.preview is None and ours.spec.num_tokens == target
    assert torch.equal(ours.tokens[0, : len(expected)], expected)
    assert [grid for _, grid in ours.conditions[0]] == [
        tuple(g[1:]) for g in inputs["image_grid_thw"][:-1].tolist()
    ]


def _reference_image(reference_pipeline, result, images, seed):
    codes = torch.cat([upsample_grid(c[None], *grid)[0] for c, grid in result.conditions[0]])
    grids = torch.tensor([[1, 2 * h, 2 * w] for _, (h, w) in result.conditions[0]])
    return reference_pipeline(
        prompt=PROMPT,
        image=images,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=3,
        prior_token_ids=result.prior_tokens,
        prior_token_image_ids=[codes],
        source_image_grid_thw=[grids],
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]


@pytest.mark.parametrize("count", [1, 2])
def test_end_to_end_equals_the_pipeline_given_the_same_codes(glm, reference_pipeline, count):
    images = CONDITIONS[count]
    ours = glm.generate(PROMPT, HEIGHT, WIDTH, num_inference_steps=3, seed=6, images=images)
    result = glm.ar.generate(PROMPT, HEIGHT, WIDTH, images=[images], seeds=[6])
    assert torch.equal(result.prior_tokens, ours.prior_token_ids)
    expected = _reference_image(reference_pipeline, result, images, 6)
    assert ours.images[0].size == (WIDTH, HEIGHT)
    assert np.abs(np.asarray(ours.images[0], dtype=np.float32) / 255 - expected).max() <= 1 / 255


def test_condition_images_change_the_result(glm):
    a = glm.generate(PROMPT, HEIGHT, WIDTH, num_inference_steps=2, seed=1, images=CONDITIONS[1])
    b = glm.generate(PROMPT, HEIGHT, WIDTH, num_inference_steps=2, seed=1, images=[_image(96, 128, 7)])
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


@pytest.mark.parametrize(
    ("images", "prompt", "message"),
    [
        ([_image(100, 128, 0)], PROMPT, r"images\[0\] height = 100 is not allowed"),
        ([_image(64, 32, 0)], PROMPT, r"images\[0\] width = 32 is not allowed"),
        ([_image(64, 320, 0)], PROMPT, "aspect ratio 320x64; allowed: at most 4:1"),
        (["/nonexistent.png"], PROMPT, r"images\[0\]: not a readable image"),
        ([_image(64, 64, 0)], [PROMPT, PROMPT], "give one list of images per prompt"),
        ([[_image(64, 64, 0)], []], [PROMPT, PROMPT], "the same number"),
    ],
)
def test_bad_condition_images_name_the_field(glm, images, prompt, message):
    with pytest.raises(GlmImageError, match=message):
        glm.generate(prompt, 64, 64, num_inference_steps=1, images=images)


def test_cli_image_to_image(tiny_checkpoint, tmp_path, cli):
    first, second = tmp_path / "in.png", tmp_path / "second.png"
    CONDITIONS[2][0].save(first)
    CONDITIONS[2][1].save(second)
    out = tmp_path / "out.png"
    common = ["--model", str(tiny_checkpoint), "--steps", "2", "--seed", "1", "-o", str(out)]
    run = cli("generate", PROMPT, "--image", str(first), str(second), "--size", "96x128", *common)
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (96, 128)
    bad = cli("generate", PROMPT, "--image", str(tmp_path / "missing.png"), *common)
    assert bad.returncode == 2 and "missing.png: not a readable image" in bad.stderr
