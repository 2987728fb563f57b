"""DiT step caching (``engine.step_cache``): off, it is the uncached forward bit for bit; on, it
computes fewer transformer passes, counts them right, keeps every image's rows to themselves (the
mixed case: one CFG branch cached, the other not; prompts of different glyph lengths; condition
images), never caches the condition images' K/V write, and stays within a PSNR bound of the
uncached images, which a cache that mixes up the branches does not."""

from __future__ import annotations

import pytest
import torch
from parallel_helpers import SIZE, conditions, prior

from glm_image.bench.metrics import psnr
from glm_image.engine import DitEngine
from glm_image.engine.step_cache import StepCache, StepCacheOptions
from glm_image.errors import GlmImageError
from glm_image.models.dit import (
    CacheMode,
    ConditionKVCache,
    attention_groups,
    image_rotary_tables,
    row_groups,
)

TWO = ["'BLUE'", "a sign that says 'a much longer text'"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The batched path (what an accelerator runs): these tests are about the rows of one forward,
    which a CPU's default (each image apart, ``batch_invariant``) never puts together."""
    return DitEngine.from_pretrained(tiny_checkpoint, batch_invariant=False)


@pytest.fixture(scope="module")
def strong_prior(tiny_checkpoint):
    """The tiny DiT with its prior embedding scaled x30. Random weights barely let the prior tokens
    move the image (guidance 1 and 1.5 agree to 42 dB); the released model's prior tokens set it.
    Scaled, the two CFG branches differ as they should (21 dB), so a cache that mixes them up shows."""
    engine = DitEngine.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        engine.model.prior_token_embedding.weight.mul_(30)
    return engine


CASES = {  # prompts, images per prompt, condition images, guidance
    "text to image": (["a sign that says 'OPEN'"], 1, False, 1.5),
    "two glyph lengths, two images each": (TWO, 2, False, 1.5),
    "image to image, two glyph lengths": (TWO, 1, True, 1.5),
    "no guidance": (["'OPEN'"], 1, False, 1.0),
}


def _call(case, steps, **kwargs):
    prompts, per_prompt, images, guidance = CASES[case]
    count = len(prompts) * per_prompt
    return {
        "prior_token_ids": prior(len(prompts)).repeat_interleave(per_prompt, dim=0),
        "prompts": prompts,
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "seeds": list(range(count)),
        "conditions": conditions(len(prompts)) if images else None,
        **kwargs,
    }


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "options",
    [StepCacheOptions(threshold=0), StepCacheOptions(threshold=10, warmup=4)],
    ids=["threshold 0", "every step in warm-up"],
)
def test_a_cache_that_caches_nothing_is_the_uncached_result_bit_for_bit(engine, case, options):
    steps = 4
    expected = engine.denoise(**_call(case, steps))
    cache = StepCache(options)
    assert torch.equal(engine.denoise(**_call(case, steps, dit_cache=cache)), expected)
    branches = 2 if CASES[case][3] > 1 else 1
    assert cache.forwards == [float(steps * branches)] * expected.shape[0]


def _expected_forwards(steps, warmup, max_consecutive, layers, branches):
    """Passes per image when every step the options allow is cached: a cached branch-step runs
    block 0 of ``layers``."""
    blocks, run = 0, 0
    for step in range(steps):
        if step < warmup or run == max_consecutive:
            blocks, run = blocks + layers, 0
        else:
            blocks, run = blocks + 1, run + 1
    return branches * blocks / layers


@pytest.mark.parametrize("case", CASES)
def test_a_positive_threshold_computes_fewer_forwards_and_says_so(engine, case, monkeypatch):
    """Threshold 10 is above any change the probe sees, so the warm-up and the run limit decide;
    the count reported equals the blocks the model ran."""
    steps, layers = 8, engine.config.dit.num_layers
    rows_through_blocks = []
    for block in engine.model.transformer_blocks:

        def spy(ops, image, *args, forward=block.forward):
            rows_through_blocks.append(image.shape[0])
            return forward(ops, image, *args)

        monkeypatch.setattr(block, "forward", spy)
    stores = []
    store = ConditionKVCache.store
    monkeypatch.setattr(ConditionKVCache, "store", lambda self, *a: (stores.append(a[0]), store(self, *a)))

    cache = StepCache(StepCacheOptions(threshold=10, warmup=2, max_consecutive=2))
    cached = engine.denoise(**_call(case, steps, dit_cache=cache))
    images, branches = cached.shape[0], 2 if CASES[case][3] > 1 else 1
    expected = _expected_forwards(steps, 2, 2, layers, branches)
    assert cache.forwards == [expected] * images and expected < steps * branches
    # the condition images' K/V write (one forward per image, every layer) is never cached
    writes = len(CASES[case][0]) * layers if CASES[case][2] else 0
    assert stores == list(range(layers)) * (writes // layers)
    assert sum(rows_through_blocks) - writes == sum(cache.forwards) * layers
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, engine.denoise(**_call(case, steps)))


class _CachesOneBranch(StepCache):
    """A scripted policy: after the first step, the rows of one CFG branch (``cached``: the
    conditional first half or the unconditional second half) always take the cache and the
    other branch's rows always compute, the mixed case."""

    def __init__(self, cached: str) -> None:
        super().__init__(StepCacheOptions(threshold=10, warmup=100))  # never decides by itself
        self.cached = cached

    def decide(self, step, before, after):
        compute = super().decide(step, before, after)  # in warm-up: every row
        half = before.shape[0] // 2
        if step == 0:
            return compute
        return [r for r in compute if (r >= half) == (self.cached == "conditional")]


MIXED = {  # prompts, with condition images
    "text to image, two glyph lengths": (TWO, False),
    "image to image, two glyph lengths": (TWO, True),
    "image to image, one glyph length": (["'BLUE'", "'GOLD'"], True),  # one key group, two samples
}


class _ExactCache(_CachesOneBranch):
    """Caches one CFG branch at every step, but with the exact residual: blocks 1.. run over the
    whole batch with the call's own key groups. A step is then the uncached step, whatever rows
    computed; only the wiring of the rows that ran alone can make it differ."""

    def __init__(self, cached: str, model) -> None:
        super().__init__(cached)
        self.model, self.first_block = model, None

    def decide(self, step, before, after):
        super().decide(step, before, after)
        half = before.shape[0] // 2
        return [r for r in range(before.shape[0]) if (r >= half) == (self.cached == "conditional")]

    def predict(self, step, rows):
        (_, _, temb, rope, groups, cache, mode, _), (first, text) = self.first_block
        rest = range(1, len(self.model.transformer_blocks))
        out, _ = type(self.model).blocks(self.model, first, text, temb, rope, groups, cache, mode, rest)
        return (out - first)[rows]


def _spy_blocks(engine, monkeypatch, policy):
    """Record the rows of every ``model.blocks`` call; hand ``policy`` block 0's inputs and outputs."""
    rows_seen, blocks = [], engine.model.blocks

    def spy(image, *args):
        out = blocks(image, *args)
        rows_seen.append(image.shape[0])
        if args[-1] == range(1):
            policy.first_block = ((image, *args), out)
        return out

    monkeypatch.setattr(engine.model, "blocks", spy)
    return rows_seen


def _mixed_call(case):
    prompts, with_images = MIXED[case]
    return {
        "prior_token_ids": prior(2, seed=2),
        "prompts": prompts,
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": 4,
        "seeds": [5, 6],
        "conditions": conditions(2) if with_images else None,
    }


@pytest.mark.parametrize("cached", ["conditional", "unconditional"])
@pytest.mark.parametrize("case", MIXED)
def test_a_mixed_step_computes_its_rows_as_the_whole_batch_would(engine, case, cached, monkeypatch):
    """One branch cached, the other's rows running blocks 1.. alone: with the exact residual in
    the cache, the result is the uncached one (glyph padding and condition samples sliced right)."""
    expected = engine.denoise(**_mixed_call(case))
    policy = _ExactCache(cached, engine.model)
    rows_seen = _spy_blocks(engine, monkeypatch, policy)
    ours = engine.denoise(**_mixed_call(case), dit_cache=policy)
    assert rows_seen.count(2) == 4, "one branch's two rows ran blocks 1.. alone at every step"
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["image to image, two glyph lengths", "image to image, one glyph length"])
def test_mixed_steps_keep_each_image_to_its_own_rows(engine, case):
    """Each image's cached rows take its own residuals: in a batch of two prompts, with the
    conditional branch cached after the first step, each image equals what its prompt gives alone."""
    call = _mixed_call(case)
    both = engine.denoise(**call, dit_cache=_CachesOneBranch("conditional"))
    for i, prompt in enumerate(call["prompts"]):
        alone = {
            **call,
            "prior_token_ids": call["prior_token_ids"][i : i + 1],
            "prompts": prompt,
            "seeds": [call["seeds"][i]],
            "conditions": [call["conditions"][i]],
        }
        torch.testing.assert_close(
            both[i : i + 1],
            engine.denoise(**alone, dit_cache=_CachesOneBranch("conditional")),
            rtol=0,
            atol=1e-5,
        )
    assert not torch.allclose(both, engine.denoise(**call))


def test_blocks_over_some_rows_equal_those_rows_of_the_whole_batch(engine):
    """``row_groups``: rows of different glyph padding, reading different condition samples of
    different lengths or none, run alone through the blocks as they run in the whole batch."""
    model, config = engine.model, engine.config.dit
    g = torch.Generator().manual_seed(3)
    dim, heads, layers = config.hidden_size, config.num_attention_heads, config.num_layers
    cache = ConditionKVCache(layers)
    for sample, length in enumerate((8, 8, 12)):
        if sample:
            cache.next_sample()
        for layer in range(layers):
            k, v = (torch.randn(1, heads, length, dim // heads, generator=g) for _ in "kv")
            cache.store(layer, k, v)
    batch, text_len = 6, 5
    keep = torch.ones(batch, text_len, dtype=torch.bool)
    keep[2, :2] = keep[4, :3] = False  # left padding of rows 2 and 4
    # rows 0, 1 and 2 read samples 0, 1 and 2: rows 0 and 1 see as many keys, one group
    read = torch.tensor([True, True, True, False, False, False])
    groups = attention_groups(batch, keep, cache, CacheMode.READ, read)
    image, text = torch.randn(batch, 16, dim, generator=g), torch.randn(batch, text_len, dim, generator=g)
    temb = torch.randn(batch, config.time_embed_dim, generator=g)
    rope = image_rotary_tables(4, 4, config.attention_head_dim, torch.device("cpu"))
    every = range(layers)
    with torch.no_grad():
        whole, _ = model.blocks(image, text, temb, rope, groups, cache, CacheMode.READ, every)
        assert groups[0].samples == (0, 1)
        for rows in ([1], [4], [0, 3], [1, 2, 5], [3, 4, 5], [0, 2, 4], [1, 3]):
            part, _ = model.blocks(
                image[rows],
                text[rows],
                temb[rows],
                rope,
                row_groups(groups, rows, cache),
                cache,
                CacheMode.READ,
                every,
            )
            torch.testing.assert_close(part, whole[rows], rtol=0, atol=1e-5)


class _OtherBranch(StepCache):
    """Broken on purpose: a cached row takes the stale residual of its image's other CFG branch."""

    def predict(self, step, rows):
        total = len(self._blocks)
        return super().predict(step, [(r + total // 2) % total for r in rows])


# Measured on the scaled tiny DiT, 128x128, 8 steps, 4 of them cached (threshold 10, warm-up 2,
# at most 2 in a row), six seeds and prompts: the cache 45.5-46.5 dB, the broken one 39.3-40.4 dB.
PSNR_BOUND = 43.0


@pytest.mark.parametrize("seed", [1, 2])
def test_the_cached_image_stays_within_the_psnr_bound_and_a_broken_cache_does_not(strong_prior, seed):
    options = StepCacheOptions(threshold=10, warmup=2, max_consecutive=2)
    call = {
        "prior_token_ids": prior(1, 128, seed),
        "prompts": "a sign that says 'OPEN'",
        "height": 128,
        "width": 128,
        "num_inference_steps": 8,
        "seeds": [seed],
    }
    uncached = strong_prior.decode(strong_prior.denoise(**call))[0]
    cache, broken = StepCache(options), _OtherBranch(options)
    cached = strong_prior.decode(strong_prior.denoise(**call, dit_cache=cache))[0]
    wrong = strong_prior.decode(strong_prior.denoise(**call, dit_cache=broken))[0]
    assert cache.forwards == broken.forwards == [12.0]  # of 16
    assert psnr(cached, uncached) >= PSNR_BOUND > psnr(wrong, uncached)


def test_the_policy_decides_per_row_and_extrapolates_to_first_order():
    """Synthetic probes and residuals: the relative L1 rule, the run limit, the counts, TaylorSeer."""
    cache = StepCache(StepCacheOptions(threshold=0.1, warmup=1, max_consecutive=1, taylor=True))
    cache.start(images=1, branches=2, layers=4)
    zero, ones = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert cache.decide(0, zero, ones) == [0, 1]  # no history: every row computes
    cache.record(0, [0, 1], ones, 3 * ones)  # residual 2
    # row 0's probe changes by 50%, row 1's by 5%: only row 1 reuses
    after = torch.stack([1.5 * torch.ones(3, 4), 1.05 * torch.ones(3, 4)])
    assert cache.decide(1, zero, after) == [0]
    torch.testing.assert_close(cache.predict(1, [1]), 2 * torch.ones(1, 3, 4))  # one point: zeroth order
    cache.record(1, [0], torch.ones(1, 3, 4), 5 * torch.ones(1, 3, 4))  # row 0's residual 4
    assert cache.decide(2, zero, after) == [1]  # row 1 reached its run limit; row 0 unchanged
    # row 0: residual 2 at step 0 and 4 at step 1, so 4 + 2 * (3 - 1) at step 3
    torch.testing.assert_close(cache.predict(3, [0]), 8 * torch.ones(1, 3, 4))
    assert cache.forwards == [(4 + 4 + 1) / 4 + (4 + 1 + 4) / 4]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (StepCacheOptions(threshold=-0.1), r"dit_cache threshold = -0.1; allowed: a number >= 0"),
        (StepCacheOptions(threshold=float("nan")), "dit_cache threshold = nan"),
        (StepCacheOptions(warmup=-1), r"dit_cache warmup = -1; allowed: an integer >= 0"),
        (StepCacheOptions(max_consecutive=1.5), r"dit_cache max_consecutive = 1.5; allowed: an integer >= 0"),
        (StepCacheOptions(taylor="yes"), "dit_cache taylor = 'yes'; allowed: true or false"),
    ],
)
def test_bad_options_name_the_field(options, message):
    with pytest.raises(GlmImageError, match=message):
        StepCache(options)


def test_denoise_wants_a_step_cache_not_its_options(engine):
    with pytest.raises(GlmImageError, match="dit_cache: got StepCacheOptions; allowed: a StepCache or None"):
        engine.denoise(**_call("text to image", 1, dit_cache=StepCacheOptions()))


@pytest.mark.parametrize(
    ("options", "forwards", "psnr_is_none"),
    [
        (StepCacheOptions(threshold=0), 8.0, True),  # caches nothing: the same images
        (
            StepCacheOptions(threshold=10, warmup=2, max_consecutive=2),
            _expected_forwards(4, 2, 2, 2, 2),
            False,
        ),
    ],
    ids=["threshold 0", "steps 2 and 3 cached"],
)
def test_bench_speed_runs_ours_with_and_without_the_cache(tiny_checkpoint, options, forwards, psnr_is_none):
    from glm_image.bench.speed import SpeedOptions, format_speed, run_speed

    report = run_speed(
        SpeedOptions(
            model=str(tiny_checkpoint), sizes=((64, 64),), steps=4, repeats=1, warmup=0, dit_cache=options
        )
    )
    (case,) = report["results"]
    assert "dit_forwards" not in case["ours"] and case["ours_cached"]["dit_forwards"] == forwards
    cache = case["cache"]
    assert (cache["dit_forwards"], cache["dit_forwards_uncached"]) == (forwards, 8)
    assert (cache["psnr_db"] is None) == psnr_is_none and cache["dit_speedup"] > 0
    assert report["config"]["dit_cache"]["threshold"] == options.threshold
    assert "of 8 transformer passes per image" in format_speed(report)


def test_bench_quality_scores_the_cached_images_against_uncached(tiny_checkpoint):
    pytest.importorskip("rapidocr")
    from glm_image.bench.quality import QualityOptions, format_quality, run_quality

    options = StepCacheOptions(threshold=10, warmup=2, max_consecutive=2)
    report = run_quality(
        QualityOptions(limit=1, model=str(tiny_checkpoint), size=(64, 64), steps=4, dit_cache=options)
    )
    ours, cached = report["results"]
    assert (ours["engine"], cached["engine"]) == ("ours", "ours_cached")
    assert cached["dit_forwards"] == _expected_forwards(4, 2, 2, 2, 2)
    assert cached["word_accuracy_delta"] == pytest.approx(cached["word_accuracy"] - ours["word_accuracy"])
    samples = [s for s in report["samples"] if s["engine"] == "ours_cached"]
    assert len(samples) == 1 and samples[0]["psnr_db"] > 0 and samples[0]["dit_forwards"] == 6.0
    assert cached["psnr_db_min"] == min(s["psnr_db"] for s in samples)
    assert "DiT cache, cvtg" in format_quality(report)
