"""The released sizes, checked on the meta device: the reference classes built from our
`glm-image` preset have the published parameter counts (no memory is allocated)."""

from __future__ import annotations

import pytest

from glm_image.config import CheckpointConfig
from glm_image.synthetic import preset_dir
from glm_image.synthetic.reference import build_reference, count_parameters

RELEASED = preset_dir("glm-image")


@pytest.fixture(scope="module")
def vle():
    return build_reference(RELEASED, "vision_language_encoder", meta=True)


def test_vision_language_encoder_is_10_1b_with_a_9b_text_model(vle):
    total = count_parameters(vle)
    text = count_parameters(vle, "model.language_model.") + count_parameters(vle, "lm_head.")
    assert total == 10_114_245_632  # 10.11B as published
    assert text == 8_914_788_352  # "about 9B": GLM-4-9B minus its text lm_head, plus the 16512-row one
    assert count_parameters(vle, "model.visual.") == 1_159_607_808
    assert count_parameters(vle, "model.vqmodel.") == 39_849_472
    assert all(p.is_meta for p in vle.parameters())


def test_text_model_shapes_follow_the_config(vle):
    c = CheckpointConfig.from_dir(RELEASED).ar.text
    layer = vle.model.language_model.layers[0]
    kv = c.num_key_value_heads * c.head_dim
    assert tuple(layer.self_attn.q_proj.weight.shape) == (c.hidden_size, c.hidden_size)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (kv, c.hidden_size) == (256, 4096)
    assert layer.self_attn.q_proj.bias is not None and layer.self_attn.o_proj.bias is None
    assert tuple(layer.mlp.gate_up_proj.weight.shape) == (2 * c.intermediate_size, c.hidden_size)
    assert tuple(vle.lm_head.weight.shape) == (c.vision_vocab_size, c.hidden_size) == (16512, 4096)
    assert tuple(vle.model.language_model.embed_tokens.weight.shape) == (c.vocab_size, c.hidden_size)
    assert len(vle.model.language_model.layers) == 40


@pytest.mark.parametrize(
    ("component", "expected"),
    [("transformer", 6_926_882_880), ("text_encoder", 217_657_472), ("vae", 406_100_643)],
)
def test_other_components_have_the_released_sizes(component, expected):
    module = build_reference(RELEASED, component, meta=True)
    assert count_parameters(module) == expected
