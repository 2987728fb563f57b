"""The synthetic checkpoint is the release's layout, written and read by the reference libraries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from glm_image.config import CheckpointConfig
from glm_image.errors import CheckpointError
from glm_image.synthetic import make_checkpoint, preset_dir
from glm_image.synthetic.reference import build_reference, count_parameters


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_matches_the_release(tiny_checkpoint):
    expected = {
        "model_index.json",
        "vision_language_encoder/config.json",
        "vision_language_encoder/generation_config.json",
        "vision_language_encoder/model.safetensors.index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
        "processor/tokenizer.json",
        "processor/tokenizer_config.json",
        "processor/chat_template.jinja",
        "scheduler/scheduler_config.json",
    }
    assert expected <= set(_digests(tiny_checkpoint))
    for component in ("vision_language_encoder", "transformer"):
        folder = tiny_checkpoint / component
        index = json.loads(next(folder.glob("*.index.json")).read_text())
        shards = sorted(folder.glob("*-of-*.safetensors"))
        assert len(shards) >= 2, f"{component} should be sharded like the release"
        assert set(index["weight_map"].values()) == {p.name for p in shards}


def test_loads_in_the_reference_pipeline(reference_pipeline, tiny_checkpoint):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
    from transformers import (
        ByT5Tokenizer,
        GlmImageForConditionalGeneration,
        GlmImageProcessor,
        T5EncoderModel,
    )

    pipe = reference_pipeline
    assert isinstance(pipe.vision_language_encoder, GlmImageForConditionalGeneration)
    assert isinstance(pipe.transformer, GlmImageTransformer2DModel)
    assert isinstance(pipe.text_encoder, T5EncoderModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.tokenizer, ByT5Tokenizer)
    assert isinstance(pipe.processor, GlmImageProcessor)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    ours = CheckpointConfig.from_dir(tiny_checkpoint)
    assert pipe.transformer.config.num_layers == ours.dit.num_layers
    assert pipe.vision_language_encoder.config.text_config.hidden_size == ours.ar.text.hidden_size
    assert pipe.vision_language_encoder.generation_config.top_p == ours.generation.top_p == 0.75


def test_reference_pipeline_decodes_prior_tokens(reference_pipeline):
    """DiT, glyph encoder, ByT5 tokenizer, scheduler and VAE of the checkpoint work together."""
    pipe = reference_pipeline
    height = width = 64
    n_prior = (height // 16) * (width // 16)

    def run(prior: torch.Tensor, seed: int) -> torch.Tensor:
        out = pipe(
            prompt="a sign that says 'OPEN'",
            prior_token_ids=prior,
            height=height,
            width=width,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        )
        return out.images

    prior = torch.randint(0, 16384, (1, n_prior), generator=torch.Generator().manual_seed(1))
    a, b = run(prior, 0), run(prior, 0)
    assert a.shape == (1, 3, height, width)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, run((prior + 1) % 16384, 0)), "prior tokens must change the image"


def test_processor_writes_the_generation_protocol(reference_pipeline):
    processor = reference_pipeline.processor
    tok = processor.tokenizer
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in (
            "<|dit_token_16384|>",
            "<|dit_token_16385|>",
            "<sop>",
            "<eop>",
            "<|image|>",
            "<|endoftext|>",
        )
    }
    assert ids == {
        "<|dit_token_16384|>": 16384,
        "<|dit_token_16385|>": 16385,
        "<sop>": 167845,
        "<eop>": 167846,
        "<|image|>": 167855,
        "<|endoftext|>": 167841,
    }
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (16384, 16385, 16385)

    messages = [[{"role": "user", "content": [{"type": "text", "text": "一张写着「春节快乐」的海报"}]}]]
    for (h, w), grids in {
        (1024, 1024): [[1, 32, 32], [1, 16, 16]],
        (1568, 1056): [[1, 49, 33], [1, 19, 13]],
        (512, 2048): [[1, 16, 64], [1, 8, 32]],
    }.items():
        out = processor.apply_chat_template(
            messages, tokenize=True, target_h=h, target_w=w, return_dict=True, return_tensors="pt"
        )
        text = tok.decode(out["input_ids"][0])
        assert text.endswith(
            f"<sop>{grids[0][1]} {grids[0][2]}<eop><sop>{grids[1][1]} {grids[1][2]}<eop><|dit_token_16384|>"
        )
        assert text.startswith("一张写着「春节快乐」的海报")
        assert out["image_grid_thw"].tolist() == grids


def test_text_tokens_live_between_the_image_vocabulary_and_the_specials(reference_pipeline):
    tok = reference_pipeline.processor.tokenizer
    for text in ('A poster that says "SUMMER SALE" 50% off', "科技发布会，2026 年", "emoji 🎨 and tabs\t!"):
        ids = tok(text)["input_ids"]
        assert all(16512 <= i < 167841 for i in ids), ids
        assert tok.decode(ids) == text


def test_same_seed_same_bytes_other_seed_other_weights(tiny_checkpoint, tmp_path):
    again = make_checkpoint(tmp_path / "again", "tiny", seed=0)
    assert _digests(again) == _digests(tiny_checkpoint)
    other = _digests(make_checkpoint(tmp_path / "other", "tiny", seed=1))
    same = _digests(tiny_checkpoint)
    for name, digest in other.items():
        if name.endswith(".safetensors"):
            assert digest != same[name], name
        elif name.endswith("config.json"):
            assert digest == same[name], name


def test_refuses_the_released_size_and_existing_folders(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="meta-device shape checks"):
        make_checkpoint("/nonexistent/out", "glm-image")
    with pytest.raises(CheckpointError, match="not empty; pass overwrite=True"):
        make_checkpoint(tiny_checkpoint, "tiny")
    with pytest.raises(CheckpointError, match="unknown preset 'huge'"):
        make_checkpoint("/nonexistent/out", "huge")


def test_wide_preset_layers_are_the_released_layers():
    """Per-layer parameter counts of `wide` (2 layers) equal the release's (40 / 30 layers)."""

    def per_layer(root: Path, component: str, prefix: str, layers: int) -> float:
        module = build_reference(root, component, meta=True)
        return count_parameters(module, prefix) / layers

    released, wide = preset_dir("glm-image"), preset_dir("wide")
    text = "model.language_model.layers."
    assert per_layer(wide, "vision_language_encoder", text, 2) == per_layer(
        released, "vision_language_encoder", text, 40
    )
    assert per_layer(wide, "transformer", "transformer_blocks.", 2) == per_layer(
        released, "transformer", "transformer_blocks.", 30
    )
