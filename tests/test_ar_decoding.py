"""AR decoding as every entry point offers it: ``GlmImage`` and ``glm-image generate``.

The decoders themselves are proven in test_jacobi.py (greedy tokens, exact distribution); here:
the option reaches the AR engine, the cost is reported, and bad values fail before any work.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from glm_image.errors import GlmImageError


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

    def spy(*args, **kwargs):
        seen.append((kwargs["decoding"], kwargs["jacobi_window"]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(glm.ar, "generate", spy)
    monkeypatch.setattr(glm, "ar_decoding", "jacobi")
    monkeypatch.setattr(glm, "jacobi_window", 3)
    glm.generate("'A'", 64, 64, num_inference_steps=1, seed=1)
    glm.generate("'A'", 64, 64, num_inference_steps=1, seed=1, ar_decoding="sequential")
    assert seen == [("jacobi", 3), ("sequential", 3)]
    assert glm.png_info("'A'", 1, 64, 64, 1, 1.5)["ar_decoding"] == "jacobi (window 3)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ar_decoding": "medusa"}, "ar_decoding = 'medusa'; allowed: sequential, jacobi"),
        ({"ar_decoding": "jacobi", "jacobi_window": 0}, "jacobi_window = 0 must be an integer >= 1"),
    ],
)
def test_bad_decoding_fails_before_any_work(glm, monkeypatch, kwargs, message):
    monkeypatch.setattr(glm.ar, "generate", lambda *a, **k: pytest.fail("the AR ran"))
    with pytest.raises(GlmImageError, match=message):
        glm.generate("'A'", 64, 64, num_inference_steps=1, **kwargs)


def test_generate_command_takes_the_decoding(tiny_checkpoint, tmp_path, cli):
    out = tmp_path / "j.png"
    common = ["generate", "'A'", "--model", str(tiny_checkpoint), "--size", "64x64", "--steps", "1"]
    run = cli(*common, "--seed", "5", "--ar-decoding", "jacobi", "--jacobi-window", "4", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert Image.open(out).text["ar_decoding"] == "jacobi (window 4)"
    bad = cli(*common, "--ar-decoding", "jacobi", "--jacobi-window", "0", "-o", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "jacobi_window = 0" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.png").exists()


def test_greedy_jacobi_prior_tokens_equal_sequential_through_the_engine_entry(glm):
    """generate_prior_tokens passes the decoding on (greedy: the tokens must be identical)."""
    sequential = glm.ar.generate_prior_tokens("'A'", 64, 96, seeds=[2], greedy=True)
    jacobi = glm.ar.generate_prior_tokens("'A'", 64, 96, seeds=[2], greedy=True, decoding="jacobi")
    assert torch.equal(jacobi, sequential)
