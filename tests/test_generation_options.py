"""AR decoding and DiT step caching as every entry point offers them: ``GlmImage`` and
``glm-image generate``.

The mechanisms are proven in test_jacobi.py (greedy tokens, exact distribution) and
test_step_cache.py (bit-identical at threshold 0, the PSNR guard); here: the options reach the
engines, the cost is reported per image, and bad values fail before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from glm_image.engine.choices import JacobiDrafts
from glm_image.errors import GlmImageError
from glm_image.request import GenerationRequest


def test_jacobi_through_the_pipeline_reports_its_forwards(glm):
    sequential = glm.generate("'A'", 64, 64, num_inference_steps=1, seed=[3, 4], num_images_per_prompt=2)
    jacobi = glm.generate(
        "'A'", 64, 64, num_inference_steps=1, seed=[3, 4], num_images_per_prompt=2, ar_decoding="jacobi"
    )
    assert sequential.ar_forwards == (sequential.ar_tokens,) * 2  # one forward per token
    assert len(jacobi.ar_forwards) == 2 and all(1 <= f <= jacobi.ar_tokens for f in jacobi.ar_forwards)
    assert jacobi.ar_forwards != sequential.ar_forwards, "random weights still accept some drafts"
    assert [image.size for image in jacobi.images] == [(64, 64)] * 2
    assert jacobi.prior_token_ids.shape == sequential.prior_token_ids.shape


def test_the_pipeline_default_and_its_override(glm, monkeypatch):
    seen = []
    generate = glm.ar.generate

    names = ("decoding", "jacobi_window", "jacobi_drafts", "jacobi_coupled", "jacobi_continued")

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs[name] for name in names))
        return generate(*args, **kwargs)

    monkeypatch.setattr(glm.ar, "generate", spy)
    monkeypatch.setattr(glm, "ar_decoding", "jacobi")
    monkeypatch.setattr(glm, "jacobi_window", 3)
    monkeypatch.setattr(glm, "jacobi", JacobiDrafts("preview", True, False))
    out = glm.generate("'A'", 64, 64, num_inference_steps=1, seed=1)
    glm.generate("'A'", 64, 64, num_inference_steps=1, seed=1, ar_decoding="sequential")
    glm.generate("'A'", 64, 64, num_inference_steps=1, seed=1, jacobi_drafts="above", jacobi_continued=True)
    glm.run(GenerationRequest("'A'", 64, 64, steps=1, seed=1))  # the server's way: the defaults
    assert seen == [
        ("jacobi", 3, "preview", True, False),
        ("sequential", 3, "preview", True, False),
        ("jacobi", 3, "above", True, True),
        ("jacobi", 3, "preview", True, False),
    ]
    text = glm.png_info(GenerationRequest("'A'", 64, 64, steps=1, seed=1), out, 0)
    assert text["ar_decoding"] == "jacobi (window 3, drafts preview, coupled)"
    assert text["ar_forwards"] == str(out.ar_forwards[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ar_decoding": "medusa"}, "ar_decoding = 'medusa'; allowed: sequential, jacobi"),
        (
            {"ar_decoding": "jacobi", "jacobi_window": 0},
            "jacobi_window = 0; allowed: an integer from 1 to 64",
        ),
        ({"jacobi_drafts": "random"}, "jacobi_drafts = 'random'; allowed: last, above, preview"),
        ({"jacobi_coupled": "yes"}, "jacobi_coupled = 'yes'; allowed: true or false"),
        ({"jacobi_continued": 0}, "jacobi_continued = 0; allowed: true or false"),
    ],
)
def test_bad_decoding_fails_before_any_work(glm, monkeypatch, kwargs, message):
    monkeypatch.setattr(glm.ar, "generate", lambda *a, **k: pytest.fail("the AR ran"))
    with pytest.raises(GlmImageError, match=message):
        glm.generate("'A'", 64, 64, num_inference_steps=1, **kwargs)


def test_generate_command_takes_the_decoding(tiny_checkpoint, tmp_path, cli):
    out = tmp_path / "j.png"
    common = ["generate", "'A'", "--model", str(tiny_checkpoint), "--size", "64x64", "--steps", "1"]
    jacobi = [
        "--ar-decoding",
        "jacobi",
        "--jacobi-window",
        "4",
        "--jacobi-drafts",
        "above",
        "--jacobi-coupled",
    ]
    run = cli(*common, "--seed", "5", *jacobi, "--no-jacobi-continued", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert Image.open(out).text["ar_decoding"] == "jacobi (window 4, drafts above, coupled)"
    bad = cli(*common, "--ar-decoding", "jacobi", "--jacobi-window", "0", "-o", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "--jacobi-window 0" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.png").exists()
    bad = cli(*common, "--ar-decoding", "jacobi", "--jacobi-drafts", "noise", "-o", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "--jacobi-drafts: invalid choice: 'noise'" in bad.stderr


def test_the_server_takes_the_draft_options(tiny_checkpoint):
    """``serve --jacobi-*`` sets the model front's defaults, which every call it plans carries;
    a bad value names its field before anything loads."""
    from glm_image.cli import build_parser
    from glm_image.options import generation_kwargs
    from glm_image.server.executors import ModelFront
    from glm_image.stages import plan_call

    argv = ["serve", "--model", str(tiny_checkpoint), "--ar-decoding", "jacobi", "--jacobi-drafts", "preview"]
    args = build_parser().parse_args([*argv, "--jacobi-coupled", "--no-jacobi-continued"])
    front = ModelFront.from_checkpoint(args.model, **generation_kwargs(args))
    assert front.jacobi == JacobiDrafts("preview", True, False)
    call = plan_call(
        [GenerationRequest("'A'", 64, 64, steps=1, seed=1)], front.limits, "jacobi", 8, front.jacobi
    )
    assert call.jacobi == front.jacobi
    with pytest.raises(GlmImageError, match="jacobi_drafts = 'up'; allowed: last, above, preview"):
        ModelFront("tiny", front.limits, jacobi_drafts="up")


def test_greedy_jacobi_prior_tokens_equal_sequential_through_the_engine_entry(glm):
    """generate_prior_tokens passes the decoding on (greedy: the tokens must be identical)."""
    sequential = glm.ar.generate_prior_tokens("'A'", 64, 96, seeds=[2], greedy=True)
    jacobi = glm.ar.generate_prior_tokens("'A'", 64, 96, seeds=[2], greedy=True, decoding="jacobi")
    assert torch.equal(jacobi, sequential)


def test_dit_cache_through_the_pipeline(glm):
    from glm_image.engine.choices import StepCacheOptions

    plain = glm.generate("'A'", 64, 64, num_inference_steps=6, seed=2)
    never = glm.generate(
        "'A'", 64, 64, num_inference_steps=6, seed=2, dit_cache=StepCacheOptions(threshold=0)
    )
    assert plain.dit_forwards == never.dit_forwards == (12.0,)  # two CFG passes per step
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(never.images[0]))
    eager = StepCacheOptions(threshold=1e9, warmup=1, max_consecutive=6)
    cached = glm.generate("'A'", 64, 64, num_inference_steps=6, seed=2, dit_cache=eager)
    layers = glm.dit.config.dit.num_layers
    # the first step computes; the 5 others run block 0 only, in both branches
    assert cached.dit_forwards == (pytest.approx(2 + 10 / layers),)


def test_generate_command_takes_the_dit_cache(tiny_checkpoint, tmp_path, cli):
    out = tmp_path / "c.png"
    common = ["generate", "'A'", "--model", str(tiny_checkpoint), "--size", "64x64", "--steps", "4"]
    cache = ["--dit-cache", "fbcache", "--dit-cache-threshold", "1e9", "--dit-cache-warmup", "1"]
    run = cli(*common, "--seed", "5", *cache, "-o", str(out))
    assert run.returncode == 0, run.stderr
    text = Image.open(out).text
    assert text["dit_cache"].startswith("fbcache (threshold 1000000000.0, warmup 1")
    assert float(text["dit_forwards"]) < 8 and "DiT " + text["dit_forwards"] in run.stdout
    bad = cli(*common, "--dit-cache", "fbcache", "--dit-cache-threshold", "-1", "-o", str(tmp_path / "x.png"))
    assert (
        bad.returncode == 2 and "--dit-cache-threshold -1.0" in bad.stderr and "Traceback" not in bad.stderr
    )
