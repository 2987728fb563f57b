"""The generation protocol as pure functions, against the reference processor and get_rope_index."""

from __future__ import annotations

import pytest
import torch

from glm_image.engine.protocol import GridSpec, decode_positions, prompt_positions, upsample_grid

SIZES = [
    (512, 512),
    (1024, 1024),
    (1568, 1056),
    (1056, 1568),
    (960, 1728),
    (512, 2048),
    (2048, 512),
    (736, 1312),
]


def processor_spec(height: int, width: int, *, with_preview: bool = True) -> GridSpec:
    """The grids the reference processor asks for at this size (what the engine reads from it)."""
    from transformers import GlmImageProcessor

    rows, cols, p_rows, p_cols = GlmImageProcessor._get_target_shape(None, height, width)
    return GridSpec((rows, cols), (p_rows, p_cols) if with_preview else None)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_grid_counts_and_order(height, width):
    spec = processor_spec(height, width)
    (rows, cols), (p_rows, p_cols) = spec.target, spec.preview
    assert spec.generated == [(p_rows, p_cols), (rows, cols)]  # the preview is written first
    assert spec.num_tokens == rows * cols + p_rows * p_cols
    assert spec.target_offset == p_rows * p_cols
    assert processor_spec(height, width, with_preview=False).num_tokens == rows * cols


def test_token_counts_of_the_design_notes():
    assert processor_spec(512, 512).num_tokens + 1 == 513
    assert processor_spec(1024, 1024).num_tokens + 1 == 1281
    assert processor_spec(2048, 2048).num_tokens + 1 == 4353


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint):
    from transformers import GlmImageForConditionalGeneration

    return GlmImageForConditionalGeneration.from_pretrained(
        tiny_checkpoint / "vision_language_encoder"
    ).eval()


def test_text_to_image_positions_match_get_rope_index(reference_model):
    ids = torch.tensor([16600, 16601, 167845, 16700, 167846, 167845, 16701, 167846, 16384])
    grids = torch.tensor([[1, 24, 16], [1, 19, 13]])
    ref_pos, _ = reference_model.model.get_rope_index(
        ids[None], image_grid_thw=grids, images_per_sample=torch.tensor([2])
    )
    ref_decode = reference_model.model._cached_decode_position_ids[0]

    pos, offset = prompt_positions(ids, image_start_id=16384, image_end_id=16385)
    spec = GridSpec((24, 16), (19, 13))
    assert torch.equal(pos, ref_pos[:, 0])
    assert torch.equal(decode_positions(offset, spec), ref_decode)


def test_positions_with_condition_images_match_get_rope_index(reference_model):
    """Image-to-image: two condition images (3x4 and 2x2 codes) inside the prompt, one target grid."""
    image_a = [16384, *range(100, 112), 16385]
    image_b = [16384, *range(200, 204), 16385]
    ids = torch.tensor([16600, *image_a, 16601, 16602, *image_b, 16603, 167845, 16700, 167846, 16384])
    grids = torch.tensor([[1, 3, 4], [1, 2, 2], [1, 20, 12]])
    ref_pos, _ = reference_model.model.get_rope_index(
        ids[None], image_grid_thw=grids, images_per_sample=torch.tensor([3])
    )
    ref_decode = reference_model.model._cached_decode_position_ids[0]

    pos, offset = prompt_positions(ids, [(3, 4), (2, 2)], image_start_id=16384, image_end_id=16385)
    assert torch.equal(pos, ref_pos[:, 0])
    assert torch.equal(decode_positions(offset, GridSpec((20, 12), None)), ref_decode)


def test_image_token_count_must_match_its_grid():
    ids = torch.tensor([16384, 1, 2, 3, 16385, 16384])
    with pytest.raises(ValueError, match="holds 3 tokens, grid 2x2"):
        prompt_positions(ids, [(2, 2)], image_start_id=16384, image_end_id=16385)


@pytest.mark.parametrize(("rows", "cols"), [(16, 16), (49, 33), (1, 5)])
def test_upsampling_matches_the_reference_pipeline(rows, cols):
    from diffusers import GlmImagePipeline

    tokens = torch.randint(0, 16384, (3, rows * cols), generator=torch.Generator().manual_seed(rows))
    expected = torch.cat([GlmImagePipeline._upsample_token_ids(t, rows, cols) for t in tokens])
    assert torch.equal(upsample_grid(tokens, rows, cols), expected)
