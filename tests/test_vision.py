"""The ViT + VQ tokenizer of condition images against transformers' GlmImageModel."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from glm_image.config import CheckpointConfig
from glm_image.models.vision import VisionEncoder
from glm_image.weights import load_model


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    from transformers import GlmImageForConditionalGeneration, GlmImageProcessor

    config = CheckpointConfig.from_dir(tiny_checkpoint).ar
    ours = load_model(
        lambda: VisionEncoder(config.vision, config.vq), tiny_checkpoint / "vision_language_encoder"
    )
    reference = GlmImageForConditionalGeneration.from_pretrained(
        tiny_checkpoint / "vision_language_encoder"
    ).eval()
    processor = GlmImageProcessor.from_pretrained(tiny_checkpoint / "processor")
    return ours.eval(), reference, processor


def _images():
    g = torch.Generator().manual_seed(0)
    sizes = [(96, 64), (48, 80)]  # (width, height): two images of different grids
    return [
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")
        for w, h in sizes
    ]


def test_features_and_tokens_equal_the_reference(models):
    ours, reference, processor = models
    inputs = processor.image_processor(images=_images(), return_tensors="pt")
    pixels, grids = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        expected = reference.model.get_image_features(pixels, grids).pooler_output
        expected_tokens = reference.model.get_image_tokens(list(expected))
        features = ours.features(pixels, [tuple(g) for g in grids.tolist()])
        tokens = ours.tokens(features)
    assert len(features) == 2
    for got, want in zip(features, expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat(tokens), expected_tokens)
    assert [t.numel() for t in tokens] == [h * w for _, h, w in grids.tolist()]


def test_reads_every_vision_tensor_of_the_checkpoint(tiny_checkpoint):
    from glm_image.weights import WeightIndex

    config = CheckpointConfig.from_dir(tiny_checkpoint).ar
    module = load_model(
        lambda: VisionEncoder(config.vision, config.vq), tiny_checkpoint / "vision_language_encoder"
    )
    stored = {n for n in WeightIndex.from_folder(tiny_checkpoint / "vision_language_encoder").tensors}
    wanted = {
        n for n in stored if n.startswith(("model.visual.", "model.vqmodel.")) and "post_quant_conv" not in n
    }
    assert set(module.checkpoint_key_map().values()) == wanted
