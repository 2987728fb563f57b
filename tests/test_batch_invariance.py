"""An image's tokens do not depend on the images decoded with it (issue 30).

Every row of a batch is compared with its solo run (the same prompt and seed, a batch of one),
bit for bit, for sequential and Jacobi decoding, over seeds, windows (also longer than the tokens
left), lengths and batch shapes, with rows ending at different iterations. On a CPU the kernels
round a row differently with the batch's shape (MKL's GEMM by row count, ATen's attention by the
key length and the prompt's padding), so without ``batch_invariant`` these comparisons fail on
some CPUs (an AVX2 EPYC: row 1 of the first case below, tokens 38 and 39).
"""

from __future__ import annotations

import pytest
import torch

from glm_image.engine import ArEngine
from glm_image.engine.choices import MAX_WINDOW
from glm_image.errors import GlmImageError

PROMPTS = ["A storefront sign that says 'OPEN'", "一张海报，标题写着「春节快乐」，背景是红色的灯笼", "'Hi'"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return ArEngine.from_pretrained(tiny_checkpoint)


def _solo_rows(engine, prompts, n, seeds, **call):
    """Each image of ``prompts x n`` run alone: (B, steps) tokens and each row's forwards."""
    tokens, forwards = [], []
    for i, seed in enumerate(seeds):
        out = engine.generate(prompts[i // n], 128, 192, seeds=[seed], **call)
        tokens.append(out.tokens[0])
        forwards.append(out.stats.image_forwards[0])
    return torch.stack(tokens), tuple(forwards)


@pytest.mark.parametrize(
    ("prompts", "n", "seeds", "window", "tokens"),
    [
        (PROMPTS[:2], 2, [11, 12, 13, 14], 4, 40),  # the case that failed on an AVX2 CPU
        (PROMPTS, 1, [3, 1, 4], 8, 33),
        (PROMPTS[:2], 3, [21, 22, 23, 24, 25, 26], 3, 57),
        (PROMPTS[1:], 2, [7, 8, 9, 10], 16, 12),  # 16 > the tokens left near the end
        (PROMPTS[:1], 3, [5, 50, 500], 64, 20),  # the largest window: longer than the whole run
    ],
)
def test_a_jacobi_row_is_its_solo_run(engine, prompts, n, seeds, window, tokens):
    call = {"decoding": "jacobi", "jacobi_window": window, "max_new_tokens": tokens}
    batched = engine.generate(prompts, 128, 192, seeds=seeds, num_images_per_prompt=n, **call)
    alone, forwards = _solo_rows(engine, prompts, n, seeds, **call)
    assert torch.equal(batched.tokens, alone)
    assert batched.stats.image_forwards == forwards
    assert batched.stats.forwards == max(forwards)
    if window < tokens:  # a window past the end accepts everything at once: rows end together
        assert len(set(forwards)) > 1, "the rows end at different iterations"


@pytest.mark.parametrize(
    ("prompts", "n", "seeds", "tokens"), [(PROMPTS[:2], 2, [11, 12, 13, 14], 40), (PROMPTS, 1, [2, 9, 6], 25)]
)
def test_a_sequential_row_is_its_solo_run(engine, prompts, n, seeds, tokens):
    call = {"max_new_tokens": tokens}
    batched = engine.generate(prompts, 128, 192, seeds=seeds, num_images_per_prompt=n, **call)
    alone, _ = _solo_rows(engine, prompts, n, seeds, **call)
    assert torch.equal(batched.tokens, alone)


def test_greedy_rows_and_logits_are_their_solo_runs(engine):
    """The raw logits of every step too (return_logits): the same bits alone and in a batch."""
    call = {"greedy": True, "max_new_tokens": 9, "return_logits": True}
    batched = engine.generate(PROMPTS, 128, 192, **call)
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate(prompt, 128, 192, **call)
        assert torch.equal(batched.tokens[i], alone.tokens[0])
        for step, solo in zip(batched.logits, alone.logits, strict=True):
            assert torch.equal(step[i], solo[0])


def test_rows_run_apart_on_a_cpu_and_together_when_asked(engine, monkeypatch):
    """The default on a CPU decodes each row as a batch of one; ``batch_invariant=False`` runs
    the batch together (one prefill of every row), as an accelerator does by default."""
    widths = []
    prefill = type(engine)._prefill

    def counting(self, batch, cache):
        widths.append(batch.input_ids.shape[0])
        return prefill(self, batch, cache)

    monkeypatch.setattr(type(engine), "_prefill", counting)
    assert engine.rows_apart
    engine.generate(PROMPTS, 128, 192, seeds=[1, 2, 3], max_new_tokens=3)
    assert widths == [1, 1, 1]
    monkeypatch.setattr(engine, "batch_invariant", False)
    widths.clear()
    together = engine.generate(PROMPTS, 128, 192, seeds=[1, 2, 3], max_new_tokens=3)
    assert widths == [3] and together.tokens.shape == (3, 3)
    with pytest.raises(GlmImageError, match="batch_invariant = 'yes'; allowed: true, false or none"):
        ArEngine(engine.model, engine.config, engine.processor, engine.device, batch_invariant="yes")


def test_the_progress_of_rows_apart_counts_every_row(engine):
    seen = []
    engine.generate(PROMPTS[:2], 128, 192, seeds=[1, 2], max_new_tokens=5, progress=lambda *a: seen.append(a))
    assert seen[-1] == ("ar", 5, 5), "the mean of the rows, as a batch run together shows it"
    assert ("ar", 2, 5) in seen, "the first row's end is half of the batch"
    assert [done for _, done, _ in seen] == sorted(done for _, done, _ in seen), "never goes back"


@pytest.mark.parametrize("window", [0, MAX_WINDOW + 1, 100000])
def test_a_window_past_the_bound_is_refused_before_any_work(engine, window, monkeypatch):
    monkeypatch.setattr(type(engine), "_prefill", lambda *a: pytest.fail("the model ran"))
    with pytest.raises(GlmImageError, match=rf"jacobi_window = {window}; allowed: an integer from 1 to 64"):
        engine.generate("'A'", 128, 192, decoding="jacobi", jacobi_window=window)


def test_the_command_line_bounds_the_window(cli, tmp_path):
    for command in (["generate", "'A'", "-o", str(tmp_path / "x.png")], ["serve"]):
        run = cli(*command, "--model", "tiny", "--ar-decoding", "jacobi", "--jacobi-window", "100000")
        assert run.returncode == 2, run.stderr
        assert "100000" in run.stderr and "1 to 64" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ the DiT and the VAE


@pytest.fixture(scope="module")
def dit(tiny_checkpoint):
    from glm_image.engine import DitEngine

    return DitEngine.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def prior(engine):
    return engine.generate_prior_tokens(PROMPTS, 128, 192, seeds=[5, 6, 7])


@pytest.mark.parametrize("guidance", [1.5, 1.0])
def test_an_image_is_denoised_and_decoded_as_alone(dit, prior, guidance):
    """Latents and pixels of each image of a batch equal its solo call's, bit for bit (batched,
    they differed by about 1e-6 and in 2 pixels by 1/255 on this machine)."""
    import numpy as np

    call = {"num_inference_steps": 3, "guidance_scale": guidance}
    latents = dit.denoise(prior, PROMPTS, 128, 192, seeds=[5, 6, 7], **call)
    images = dit.decode(latents)
    for i, seed in enumerate([5, 6, 7]):
        alone = dit.denoise(prior[i : i + 1], PROMPTS[i], 128, 192, seeds=[seed], **call)
        assert torch.equal(latents[i], alone[0])
        assert np.array_equal(np.asarray(images[i]), np.asarray(dit.decode(alone)[0]))


def test_images_per_prompt_and_the_step_cache_apart(dit, prior, monkeypatch):
    """Two images per prompt (the prompt of image i is prompts[i // 2]) and a step cache: each
    image's passes are its solo call's, listed in order; progress is the images' mean."""
    from glm_image.engine.choices import StepCacheOptions
    from glm_image.engine.step_cache import StepCache

    rows = prior[[0, 0, 1, 1]]
    options = StepCacheOptions(threshold=0.5, warmup=1)
    cache, seen = StepCache(options), []
    call = {"num_inference_steps": 4, "dit_cache": cache}
    both = dit.denoise(
        rows, PROMPTS[:2], 128, 192, seeds=[1, 2, 3, 4], progress=lambda *a: seen.append(a), **call
    )
    assert seen[-1] == ("dit", 4, 4) and ("dit", 1, 4) in seen
    forwards = []
    for i, seed in enumerate([1, 2, 3, 4]):
        solo = StepCache(options)
        alone = dit.denoise(
            rows[i : i + 1], PROMPTS[i // 2], 128, 192, seeds=[seed], **(call | {"dit_cache": solo})
        )
        assert torch.equal(both[i], alone[0])
        forwards += solo.forwards
    assert cache.forwards == forwards
    monkeypatch.setattr(dit, "batch_invariant", False)  # together: one call of 4 images
    calls = []
    forward = type(dit.model).forward
    monkeypatch.setattr(
        type(dit.model),
        "forward",
        lambda self, *a, **k: calls.append(a[0].shape[0]) or forward(self, *a, **k),
    )
    dit.denoise(rows, PROMPTS[:2], 128, 192, seeds=[1, 2, 3, 4], num_inference_steps=1)
    assert calls == [8], "4 images x 2 CFG rows in one forward"
