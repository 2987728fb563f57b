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
    assert seen[-1] == ("ar", 10, 10)
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
