"""LoRA end to end: GlmImage with a PEFT adapter on both stages equals diffusers' pipeline whose
AR and DiT carry the same adapter through PEFT (images within 1/255)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_helpers import peft_ar, peft_dit

from glm_image import GlmImage
from glm_image.errors import GlmImageError

PROMPT = "A storefront sign that says 'OPEN'"


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    """One folder with an AR and a DiT adapter; the reference pipeline wearing both."""
    from diffusers import GlmImagePipeline

    root = tmp_path_factory.mktemp("lora") / "both"
    ar = peft_ar(tiny_checkpoint, root / "vision_language_encoder")
    dit = peft_dit(tiny_checkpoint, root / "transformer", lora_alpha=8)
    reference = GlmImagePipeline.from_pretrained(
        tiny_checkpoint, vision_language_encoder=ar.base_model.model, transformer=dit.base_model.model
    )
    return root, reference


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return GlmImage.from_pretrained(tiny_checkpoint, device="cpu")


def _pixels(output) -> np.ndarray:
    return np.asarray(output.images[0], dtype=np.float32) / 255


def test_generate_with_an_adapter_equals_the_peft_pipeline(pipe, adapter):
    root, reference = adapter
    expected = reference(
        prompt=PROMPT,
        height=128,
        width=128,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    ours = pipe.generate(PROMPT, 128, 128, num_inference_steps=3, seed=0, lora=[(root, 1.0)])
    assert np.abs(_pixels(ours) - expected).max() <= 1 / 255
    base = pipe.generate(PROMPT, 128, 128, num_inference_steps=3, seed=0)
    assert np.abs(_pixels(base) - expected).max() > 10 / 255, "the adapter must change the image"
    zero = pipe.generate(PROMPT, 128, 128, num_inference_steps=3, seed=0, lora=[(root, 0.0)])
    assert np.array_equal(np.asarray(zero.images[0]), np.asarray(base.images[0]))


def test_merged_at_load_equals_unmerged_per_call(tiny_checkpoint, pipe, adapter):
    root, _ = adapter
    merged = GlmImage.from_pretrained(tiny_checkpoint, device="cpu", lora=[(root, 0.7)])
    assert merged.lora.merged and not merged.lora.sources
    got = merged.generate(PROMPT, 128, 128, num_inference_steps=3, seed=1)
    expected = pipe.generate(PROMPT, 128, 128, num_inference_steps=3, seed=1, lora=[(root, 0.7)])
    assert np.abs(_pixels(got) - _pixels(expected)).max() <= 1 / 255
    fixed = GlmImage.from_pretrained(tiny_checkpoint, device="cpu", lora=[(root, 0.7)], lora_mode="unmerged")
    again = fixed.generate(PROMPT, 128, 128, num_inference_steps=3, seed=1)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(expected.images[0]))


def test_bad_lora_arguments_fail_before_work(tiny_checkpoint, pipe, tmp_path):
    with pytest.raises(GlmImageError, match="lora_mode = 'fused'; allowed: auto, merged, unmerged"):
        GlmImage.from_pretrained(tiny_checkpoint, lora=[(tmp_path, 1.0)], lora_mode="fused")
    with pytest.raises(GlmImageError, match="neither a loaded adapter"):
        pipe.generate(PROMPT, 128, 128, num_inference_steps=3, lora=[(tmp_path / "absent", 1.0)])
    with pytest.raises(GlmImageError, match="must be a finite number"):
        pipe.generate(PROMPT, 128, 128, num_inference_steps=3, lora=[("x", "big")])


def test_cli_generate_with_lora_writes_the_adapters_image(tiny_checkpoint, pipe, adapter, tmp_path, capsys):
    from PIL import Image

    from glm_image.cli import main

    root, _ = adapter
    out = tmp_path / "a.png"
    flags = [PROMPT, "--model", str(tiny_checkpoint), "--size", "64x64", "--steps", "1"]
    assert main(["generate", *flags, "--seed", "2", "--lora", f"{root}:0.5", "-o", str(out)]) == 0
    expected = pipe.generate(PROMPT, 64, 64, num_inference_steps=1, seed=2, lora=[(root, 0.5)])
    image = Image.open(out)
    assert image.text["lora"] == f"{root}:0.5"  # merged at load: recorded with its scale
    assert np.abs(np.asarray(image, dtype=np.float32) / 255 - _pixels(expected)).max() <= 1 / 255
    assert main(["generate", *flags, "--lora", str(tmp_path / "absent"), "-o", str(out)]) == 2
    assert "absent: no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("together", [False, True])
def test_requests_with_different_adapters_share_a_call_and_get_their_own_images(
    tiny_checkpoint, adapter, tmp_path, together
):
    """One engine call for three requests (adapter a, none, adapter b at 0.6): each gets the
    images it gets alone. Rows apart (the CPU default: bit for bit) and rows together in each
    forward (the GPU default, forced here: within 1/255; the DiT's CFG rows follow their image)."""
    from glm_image.request import GenerationRequest

    root, _ = adapter
    peft_ar(tiny_checkpoint, tmp_path / "qv", seed=5, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    pipe = GlmImage.from_pretrained(tiny_checkpoint, device="cpu")
    if together:
        pipe.ar.batch_invariant = pipe.dit.batch_invariant = False
    pipe.load_lora("a", root)
    pipe.load_lora("b", tmp_path / "qv")
    requests = [
        GenerationRequest(PROMPT, 64, 64, steps=2, seed=4, lora=(("a", 1.0),)),
        GenerationRequest(PROMPT, 64, 64, steps=2, seed=4, num_images=2),
        GenerationRequest(PROMPT, 64, 64, steps=2, seed=4, lora=(("b", 0.6),)),
    ]
    calls = []
    run = pipe.handles[0].run
    pipe.handles[0].run = lambda call, progress=None: calls.append(call) or run(call, progress)
    together_out = pipe.run_batch(requests)
    assert len(calls) == 1, "one engine call for the three requests"
    alone = [pipe.run(r) for r in requests]
    for got, want in zip(together_out, alone, strict=True):
        for image, expected in zip(got.images, want.images, strict=True):
            diff = np.abs(np.asarray(image, dtype=np.float32) - np.asarray(expected, dtype=np.float32)).max()
            assert diff == 0 if not together else diff <= 1, diff
    first, plain = (
        np.asarray(alone[0].images[0], dtype=np.float32),
        np.asarray(alone[1].images[0], dtype=np.float32),
    )
    assert np.abs(first - plain).max() > 10
