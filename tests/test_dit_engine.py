"""The DiT stage end to end against GlmImagePipeline: glyphs, schedule, CFG, latents, pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm_image.engine import DitEngine
from glm_image.errors import GlmImageError
from glm_image.models.dit import CacheMode
from glm_image.models.glyph import glyph_texts


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return DitEngine.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize(
    "prompt",
    [
        "a sign that says 'OPEN'",
        "poster: \"SUMMER SALE\" and 'today only' and “50% off”",
        "一张海报，标题写着「春节快乐」，副标题“万事如意”",
        "no quotes at all",
        "unbalanced 'quote and 「bracket",
        "it's Anna's 'cake'",
    ],
)
def test_glyph_texts_match_the_pipeline(reference_pipeline, prompt):
    assert glyph_texts(prompt) == reference_pipeline.get_glyph_texts(prompt)[0]


def test_glyph_embeddings_match_the_pipeline(engine, reference_pipeline):
    prompts = ["a sign that says 'OPEN'", "「春节快乐」 and 'a' and 'bc'", "nothing quoted"]
    expected = reference_pipeline._get_glyph_embeds(prompts, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(engine.glyph.encode(prompts), expected, rtol=0, atol=1e-5)


def _prior(batch, height, width, seed=1):
    n = (height // 16) * (width // 16)
    return torch.randint(0, 16384, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("height", "width", "guidance"), [(64, 64, 1.5), (64, 128, 1.5), (96, 64, 1.0)])
def test_latents_and_pixels_match_the_pipeline(engine, reference_pipeline, height, width, guidance):
    prompt = "a storefront sign that says 'OPEN'"
    prior = _prior(1, height, width)
    noise = torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(2))
    common = {
        "prior_token_ids": prior,
        "height": height,
        "width": width,
        "num_inference_steps": 4,
        "guidance_scale": guidance,
    }
    expected = reference_pipeline(prompt=prompt, latents=noise.clone(), output_type="latent", **common).images
    ours = engine.denoise(prior, prompt, height, width, 4, guidance, latents=noise.clone())
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)

    pixels = reference_pipeline(prompt=prompt, latents=noise.clone(), output_type="np", **common).images[0]
    image = engine.decode(ours)[0]
    assert image.size == (width, height) and image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=np.float32) / 255 - pixels).max() <= 1 / 255


def test_a_batch_of_prompts_matches_the_pipeline(engine, reference_pipeline):
    prompts = ["a sign that says 'OPEN'", "一张写着「春节快乐」的海报"]
    prior = _prior(4, 64, 64, seed=3)
    noise = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    expected = reference_pipeline(
        prompt=prompts,
        prior_token_ids=prior[::2],  # the pipeline repeats each prompt's prior tokens itself
        latents=noise.clone(),
        height=64,
        width=64,
        num_inference_steps=3,
        num_images_per_prompt=2,
        output_type="latent",
    ).images
    prior = prior[::2].repeat_interleave(2, dim=0)
    ours = engine.denoise(prior, prompts, 64, 64, 3, latents=noise.clone(), isolate_prompts=False)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)

    # By default each prompt's glyph padding is hidden: every image equals its prompt alone,
    # while the reference's batch lets the padding of the shorter prompt change its images.
    isolated = engine.denoise(prior, prompts, 64, 64, 3, latents=noise.clone())
    for i, prompt in enumerate(prompts):
        rows = slice(2 * i, 2 * i + 2)
        alone = engine.denoise(prior[rows], prompt, 64, 64, 3, latents=noise[rows].clone())
        torch.testing.assert_close(isolated[rows], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(isolated, expected, rtol=0, atol=1e-4)


def test_batched_guidance_equals_two_forwards(engine):
    """One forward over [cond; uncond] with padded glyphs equals the two separate forwards."""
    model, glyph = engine.model, engine.glyph
    cond = glyph.encode(["'a long quoted text to render'"])
    uncond = glyph.encode([""])
    assert cond.shape[1] != uncond.shape[1]
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    prior = torch.randint(0, 16384, (1, 16), generator=g)
    rest = (torch.tensor([500.0]), torch.tensor([[64.0, 64.0]]), torch.zeros(1, 2))
    keep, drop = torch.zeros(1, 16, dtype=torch.bool), torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        a = model(latents, cond, prior, keep, *rest)
        b = model(latents, uncond, prior, drop, *rest)
        from glm_image.engine.dit_engine import _stack_padded

        text, mask = _stack_padded(cond, uncond)
        both = model(
            torch.cat([latents, latents]),
            text,
            torch.cat([prior, prior]),
            torch.cat([keep, drop]),
            *(torch.cat([x, x]) for x in rest),
            text_keep=mask,
        )
    torch.testing.assert_close(both[0:1], a, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1:2], b, rtol=0, atol=1e-5)


def test_seeds_number_the_images_and_batches_equal_singles(engine):
    prior = _prior(2, 64, 64, seed=6)
    both = engine.denoise(prior, "'x'", 64, 64, 2, seeds=[7, 8])
    one = engine.denoise(prior[:1], "'x'", 64, 64, 2, seeds=[7])
    two = engine.denoise(prior[1:], "'x'", 64, 64, 2, seeds=8)
    torch.testing.assert_close(both, torch.cat([one, two]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 48}, "height = 48 is not allowed; allowed: 64..1024 in multiples of 32"),
        ({"prior_token_ids": torch.zeros(1, 5, dtype=torch.long)}, r"prior_token_ids: shape \(1, 5\)"),
        ({"guidance_scale": 0.5}, "guidance_scale = 0.5 must be >= 1"),
        ({"prompts": ["a", "b", "c"]}, "3 prompts for 2 images"),
        ({"seeds": [1]}, "seeds: got 1, need one per image"),
    ],
)
def test_bad_requests_name_the_field(engine, kwargs, message):
    call = {
        "prior_token_ids": _prior(2, 64, 64),
        "prompts": "p",
        "height": 64,
        "width": 64,
        "num_inference_steps": 1,
    }
    with pytest.raises(GlmImageError, match=message):
        engine.denoise(**(call | kwargs))


def test_cache_modes_are_an_enum():
    assert {m.value for m in CacheMode} == {"write", "read", "skip"}


def test_tiled_decode_never_runs_the_decoder_on_the_full_frame(engine, monkeypatch):
    seen = []
    forward = engine.vae.decoder.forward

    def spy(z, *args, **kwargs):
        seen.append(tuple(z.shape[-2:]))
        return forward(z, *args, **kwargs)

    monkeypatch.setattr(engine.vae.decoder, "forward", spy)
    latents = torch.randn(1, 16, 32, 24, generator=torch.Generator().manual_seed(9))
    full = engine.decode(latents, tiled=False)[0]
    assert seen == [(32, 24)]
    seen.clear()
    tiled = engine.decode(latents, tiled=True)[0]
    tile = engine.vae.tile_latent_min_size
    assert len(seen) > 1 and all(h <= tile and w <= tile for h, w in seen)
    assert tiled.size == full.size == (24 * 8, 32 * 8)
    seen.clear()
    engine.decode(latents)  # 256x192 pixels: below the automatic tiling threshold
    assert seen == [(32, 24)]
