"""GlmImage end to end: same prompt, size and seed as diffusers' GlmImagePipeline -> same image."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from glm_image import GlmImage
from glm_image.config import CheckpointConfig
from glm_image.errors import GlmImageError
from glm_image.synthetic import preset_dir


@pytest.mark.parametrize(
    ("prompt", "height", "width", "seed"),
    [("A storefront sign that says 'OPEN'", 128, 128, 0), ("一张写着「春节快乐」的海报", 96, 160, 5)],
)
def test_text_to_image_equals_the_pipeline(glm, reference_pipeline, prompt, height, width, seed):
    ours = glm.generate(prompt, height, width, num_inference_steps=3, seed=seed)
    expected = reference_pipeline(
        prompt=prompt,
        height=height,
        width=width,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]
    image = ours.images[0]
    assert image.size == (width, height) and ours.seeds == (seed,)
    assert np.abs(np.asarray(image, dtype=np.float32) / 255 - expected).max() <= 1 / 255
    assert set(ours.timings) == {"ar", "ar_prefill", "dit", "vae"}
    assert (
        0 < ours.timings["ar_prefill"] < ours.timings["ar"]
        and ours.ar_tokens == glm.ar.generate(prompt, height, width, max_new_tokens=1).spec.num_tokens
    )


def test_images_of_a_batch_equal_the_same_seeds_alone(glm):
    batch = glm.generate(["'A'", "'B'"], 64, 64, num_inference_steps=2, seed=10, num_images_per_prompt=2)
    assert batch.seeds == (10, 11, 12, 13) and len(batch.images) == 4
    alone = glm.generate("'B'", 64, 64, num_inference_steps=2, seed=13)
    # batched GEMMs round differently in the last bits: at most one 8-bit level apart
    diff = np.abs(np.asarray(batch.images[3], dtype=np.int16) - np.asarray(alone.images[0], dtype=np.int16))
    assert diff.max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 1056}, "height = 1056 is not allowed; allowed: 64..1024 in multiples of 32"),
        ({"width": 100}, "width = 100 is not allowed"),
        ({"width": 32}, "allowed: 64..1024"),
        ({"num_inference_steps": 0}, "num_inference_steps = 0; allowed: an integer >= 1"),
        ({"guidance_scale": 0.9}, r"guidance_scale = 0.9; allowed: a number in 1\.\.20"),
        ({"guidance_scale": 20.5}, r"guidance_scale = 20.5; allowed: a number in 1\.\.20"),
        ({"guidance_scale": float("inf")}, "guidance_scale = inf"),
        ({"guidance_scale": float("nan")}, "guidance_scale = nan"),
        ({"guidance_scale": True}, "guidance_scale = True"),
        ({"prompt": "a\ud800b"}, "prompt: not valid Unicode text"),
        ({"prompt": "x" * 1001}, "prompt: 1001 characters; allowed: at most 1000"),
        ({"prompt": "   "}, "prompt: must be a non-empty string"),
        ({"prompt": []}, "need at least one prompt"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt = 0"),
    ],
)
def test_bad_requests_name_the_field(glm, kwargs, message):
    call = {"prompt": "p", "height": 64, "width": 64, "num_inference_steps": 1} | kwargs
    with pytest.raises(GlmImageError, match=message):
        glm.generate(**call)


def test_released_limits_come_from_the_config():
    config = CheckpointConfig.from_dir(preset_dir("glm-image"))
    stub = types.SimpleNamespace(config=config, device=torch.device("cpu"))
    limits = GlmImage(stub, stub, "glm-image").limits
    assert (limits.minimum, limits.maximum, limits.multiple) == (512, 2048, 32)


def test_cli_info_in_a_subprocess(tiny_checkpoint, cli):
    run = cli("info", "--model", str(tiny_checkpoint))
    assert run.returncode == 0, run.stderr
    assert "transformers.GlmImageForConditionalGeneration" in run.stdout and "attention: sdpa" in run.stdout


def test_cli_generate_writes_pngs_with_their_parameters(tiny_checkpoint, tmp_path, cli):
    out = tmp_path / "open.png"
    run = cli(
        "generate",
        "a sign that says 'OPEN'",
        "--model",
        str(tiny_checkpoint),
        "--size",
        "96x64",
        "--steps",
        "2",
        "--seed",
        "7",
        "-o",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    image = Image.open(out)
    assert image.size == (96, 64)
    assert image.text["prompt"] == "a sign that says 'OPEN'" and image.text["seed"] == "7"
    assert image.text["size"] == "96x64" and image.text["steps"] == "2" and image.text["guidance"] == "1.5"
    assert image.text["engine"].startswith("glm-image ")

    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        json.dumps({"prompt": "'A'", "size": "64x64", "seed": 1})
        + "\n\n"
        + json.dumps({"prompt": "「乙」", "steps": 1})
        + "\n"
    )
    run = cli(
        "generate",
        "--prompts",
        str(batch),
        "--model",
        str(tiny_checkpoint),
        "--size",
        "64x96",
        "--steps",
        "2",
        "-o",
        str(tmp_path / "b.png"),
    )
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "b-1.png").size == (64, 64)
    second = Image.open(tmp_path / "b-2.png")
    assert second.size == (64, 96) and second.text["prompt"] == "「乙」" and second.text["steps"] == "1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["p", "--size", "100x64"], "--size 100x64: width 100 is not allowed"),
        (["p", "--size", "64x2048"], "--size 64x2048: height 2048 is not allowed"),
        (["p", "--steps", "0"], "--steps 0"),
        (["p", "--guidance", "0.5"], "--guidance 0.5"),
        (["p", "--guidance", "inf"], "--guidance inf; allowed: a number in 1..20"),
        (["x" * 1001], "prompt: 1001 characters"),
        ([], "prompt: give a prompt, or --prompts"),
        (["--prompts", "/nonexistent.jsonl"], "--prompts /nonexistent.jsonl: cannot be read"),
        (["p", "--attention-backend", "npu"], "--attention-backend 'npu' cannot run on cpu"),
        (["p", "--device", "tpu"], "--device 'tpu' is not supported; allowed: cpu, cuda, npu"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_field(tiny_checkpoint, tmp_path, args, message, cli):
    run = cli("generate", *args, "--model", str(tiny_checkpoint), "-o", str(tmp_path / "x.png"))
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_cli_rejects_a_bad_size_string(tmp_path, cli):
    run = cli("generate", "p", "--size", "big")
    assert run.returncode == 2 and "expected WIDTHxHEIGHT" in run.stderr


def test_offloaded_stages_take_turns_and_give_the_same_image(tiny_checkpoint, glm):
    """Offloading moves a stage to its waiting place between runs; the image must not change."""
    turns = GlmImage.from_pretrained(tiny_checkpoint, device="cpu", offload=True)
    assert turns.offload_to == torch.device("cpu")
    moved = []
    for engine in (turns.ar, turns.dit):
        original = engine.to
        engine.to = lambda device, original=original, engine=engine: (
            moved.append((engine, str(device))),
            original(device),
        )[1]
    a = turns.generate("'A'", 64, 64, num_inference_steps=2, seed=3)
    b = glm.generate("'A'", 64, 64, num_inference_steps=2, seed=3)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert (turns.dit, "cpu") in moved and (turns.ar, "cpu") in moved and glm.offload_to is None


def test_run_batch_gives_each_request_its_own_images(glm):
    from glm_image.request import GenerationRequest

    a = GenerationRequest("'A'", 64, 64, steps=2, seed=20, num_images=2)
    b = GenerationRequest("「乙」", 64, 64, steps=2, seed=7)
    batch = glm.run_batch([a, b])
    assert [r.seeds for r in batch] == [(20, 21), (7,)]
    for request, got in zip((a, b), batch, strict=True):
        alone = glm.run(request)
        assert torch.equal(got.prior_token_ids, alone.prior_token_ids)
        for x, y in zip(got.images, alone.images, strict=True):
            diff = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
            assert diff.max() <= 1
    with pytest.raises(GlmImageError, match="batch_key"):
        glm.run_batch([a, GenerationRequest("'A'", 64, 96, steps=2)])


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        ([1, 2, 3], "got 3 seeds for 2 images"),
        ("7", "seed = '7'"),
        ([1, True], "one integer per image"),
        (-1, r"allowed: 0\.\.9223372036854775807"),
        (2**63 - 1, r"image i uses seed \+ i"),
        (2**64 - 1, "allowed: 0"),
    ],
)
def test_bad_seeds_name_the_field(glm, seed, message):
    with pytest.raises(GlmImageError, match=message):
        glm.generate("p", 64, 64, num_inference_steps=1, seed=seed, num_images_per_prompt=2)
