"""Our AR model and decode engine against transformers and diffusers on the same tiny weights."""

from __future__ import annotations

import pytest
import torch
from ar_helpers import prompt_logits

from glm_image.engine import ArEngine
from glm_image.errors import GlmImageError

PROMPT = "A storefront sign that says 'OPEN'"
SIZES = [(512, 512), (384, 640)]  # square, and not square


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return ArEngine.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_prefill_logits_match(engine, reference_pipeline, height, width):
    inputs = engine.processor_inputs(PROMPT, height, width)
    with torch.no_grad():
        expected = reference_pipeline.vision_language_encoder(**inputs).logits
    logits, valid = prompt_logits(engine, PROMPT, height, width)
    assert valid.all() and logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_greedy_protocol_and_decode_logits_match_generate(engine, reference_pipeline, height, width):
    inputs = engine.processor_inputs(PROMPT, height, width)
    ours = engine.generate(
        PROMPT,
        height,
        width,
        greedy=True,
        constrain_grid=False,
        include_eos=True,
        return_logits=True,
    )
    with torch.no_grad():
        out = reference_pipeline.vision_language_encoder.generate(
            **inputs,
            max_new_tokens=ours.spec.num_tokens + 1,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    generated = out.sequences[0, inputs["input_ids"].shape[1] :]
    assert ours.tokens.shape[1] == ours.spec.num_tokens + 1
    # generate stops when every sequence has ended; past that point we only write padding
    assert torch.equal(ours.tokens[0, : len(generated)], generated)
    assert (ours.tokens[0, len(generated) :] == engine.config.generation.pad_token_id).all()
    for step, expected in enumerate(out.logits):
        torch.testing.assert_close(ours.logits[step], expected, rtol=0, atol=1e-5, msg=f"step {step}")


def _reference_prior(pipe, prompt, height, width, seed):
    prior, _, _ = pipe.generate_prior_tokens(
        prompt, height, width, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed)
    )
    return prior


@pytest.mark.parametrize(("height", "width", "seed"), [(512, 512, 0), (384, 640, 3)])
def test_seeded_sampling_equals_diffusers(engine, reference_pipeline, height, width, seed):
    expected = _reference_prior(reference_pipeline, PROMPT, height, width, seed)
    assert (expected < 16384).all(), "pick a seed where the reference writes a valid grid"
    for constrain in (False, True):
        ours = engine.generate_prior_tokens(PROMPT, height, width, seeds=[seed], constrain_grid=constrain)
        assert ours.shape == (1, (height // 16) * (width // 16))
        assert torch.equal(ours, expected), f"constrain_grid={constrain}"


def test_batched_equals_one_by_one(engine):
    prompts = ["a cat", "一张海报，标题写着「春节快乐」，背景是红色的灯笼和烟花，下方写着 2026"]
    seeds = [11, 12, 13, 14]
    batched = engine.generate_prior_tokens(prompts, 384, 640, seeds=seeds, num_images_per_prompt=2)
    single = [
        engine.generate_prior_tokens(prompts[i // 2], 384, 640, seeds=[seed]) for i, seed in enumerate(seeds)
    ]
    assert torch.equal(batched, torch.cat(single))
    assert not torch.equal(batched[0], batched[1]), "each image of a prompt has its own seed"

    greedy = engine.generate(prompts, 384, 640, greedy=True).tokens
    for i, prompt in enumerate(prompts):
        assert torch.equal(greedy[i], engine.generate(prompt, 384, 640, greedy=True).tokens[0])


def test_a_single_int_seed_numbers_the_images(engine):
    a = engine.generate_prior_tokens(PROMPT, 512, 512, seeds=5, num_images_per_prompt=2)
    b = engine.generate_prior_tokens(PROMPT, 512, 512, seeds=[5, 6], num_images_per_prompt=2)
    assert torch.equal(a, b)


def test_constrained_grid_never_writes_a_special_token(engine, monkeypatch):
    """Make EOS overwhelmingly likely: the reference behaviour ends the grid, constrain_grid cannot."""
    eos = engine.config.ar.text.eos_token_id
    logits = engine.model.logits

    def eos_loving(hidden):
        out = logits(hidden)
        out[..., eos] += 100.0
        return out

    monkeypatch.setattr(engine.model, "logits", eos_loving)
    for greedy in (False, True):
        tokens = engine.generate(PROMPT, 512, 512, seeds=[1], greedy=greedy).tokens
        assert (tokens < engine.config.ar.vq.num_embeddings).all()
    unconstrained = engine.generate(PROMPT, 512, 512, seeds=[1], constrain_grid=False)
    assert unconstrained.tokens[0, 0] == eos and unconstrained.prior_tokens is None
    with pytest.raises(GlmImageError, match="constrain_grid=True"):
        engine.generate_prior_tokens(PROMPT, 512, 512, seeds=[1], constrain_grid=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 500}, "height = 500 is not allowed; allowed: 64..1024 in multiples of 32"),
        ({"width": 0}, "width = 0 is not allowed; allowed: 64..1024 in multiples of 32"),
        ({"height": 1056}, "height = 1056 is not allowed; allowed: 64..1024"),
        ({"seeds": [1, 2]}, "seeds: got 2, need one per image"),
        ({"prompts": []}, "need at least one prompt"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt = 0"),
    ],
)
def test_bad_requests_name_the_field(engine, kwargs, message):
    call = {"prompts": PROMPT, "height": 512, "width": 512} | kwargs
    with pytest.raises(GlmImageError, match=message):
        engine.generate_prior_tokens(**call)


def test_meta_model_maps_one_to_one_onto_the_released_checkpoint():
    from glm_image.config import CheckpointConfig
    from glm_image.models.ar import ArModel
    from glm_image.synthetic import preset_dir
    from glm_image.synthetic.reference import build_reference
    from glm_image.weights import Fuse, build_on_meta

    root = preset_dir("glm-image")
    ours = build_on_meta(lambda: ArModel(CheckpointConfig.from_dir(root).ar.text))
    released = {
        name: tuple(t.shape)
        for name, t in build_reference(root, "vision_language_encoder", meta=True).state_dict().items()
        if not name.startswith(ArModel.UNUSED_CHECKPOINT_PREFIXES)
    }
    used = []
    for name, tensor in ours.state_dict().items():
        source = ours.checkpoint_key_map()[name]
        sources = source.sources if isinstance(source, Fuse) else (source,)
        shapes = [released[s] for s in sources]
        fused = (sum(s[0] for s in shapes), *shapes[0][1:])
        assert tuple(tensor.shape) == fused, name
        used.extend(sources)
    assert sorted(used) == sorted(released), "every released text-model tensor is read exactly once"
    assert sum(t.numel() for t in ours.state_dict().values()) == 8_914_788_352


def test_bfloat16_prefill_is_close_to_the_reference_in_bfloat16(tiny_checkpoint):
    """bf16 rounding differs between a fused and a split q/k/v GEMM, so only closeness holds."""
    from transformers import GlmImageForConditionalGeneration

    prompt, height, width = "一张写着「欢迎」的海报", 512, 768
    engine = ArEngine.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    reference = GlmImageForConditionalGeneration.from_pretrained(
        tiny_checkpoint / "vision_language_encoder", dtype=torch.bfloat16
    ).eval()
    inputs = engine.processor_inputs(prompt, height, width)
    with torch.no_grad():
        expected = reference(**inputs).logits.float()
    logits, _ = prompt_logits(engine, prompt, height, width)
    assert engine.model.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-2)
    assert engine.generate_prior_tokens(prompt, height, width, seeds=[0]).shape == (1, 32 * 48)


def test_max_new_tokens_stops_early(engine):
    partial = engine.generate(PROMPT, 512, 512, seeds=[2], max_new_tokens=10)
    whole = engine.generate(PROMPT, 512, 512, seeds=[2])
    assert partial.tokens.shape == (1, 10) and partial.prior_tokens is None
    assert torch.equal(partial.tokens, whole.tokens[:, :10])
    with pytest.raises(GlmImageError, match="max_new_tokens = 0"):
        engine.generate(PROMPT, 512, 512, max_new_tokens=0)


def test_do_sample_false_in_the_generation_config_makes_greedy_the_default(tiny_copy):
    import json

    path = tiny_copy / "vision_language_encoder" / "generation_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "do_sample": False}))
    engine = ArEngine.from_pretrained(tiny_copy)
    default = engine.generate(PROMPT, 64, 64, seeds=[5], max_new_tokens=12).tokens
    assert torch.equal(
        default, engine.generate(PROMPT, 64, 64, seeds=[5], greedy=True, max_new_tokens=12).tokens
    )
    sampled = engine.generate(PROMPT, 64, 64, seeds=[5], greedy=False, max_new_tokens=12).tokens
    assert not torch.equal(sampled, default)
