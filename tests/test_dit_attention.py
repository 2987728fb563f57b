"""The DiT attends without a mask: every denoise (text- or image-to-image, one or several prompts
of different glyph lengths, isolated or as the reference's batch) calls ``ops.attention`` with
mask=None, once per run of rows that see the same keys, over exactly those keys.

That the results equal GlmImagePipeline's is tested in test_dit_engine.py (one prompt with and
without quotes, several prompts with ``isolate_prompts=False``), test_image_to_image.py and
test_pipeline.py; here a batch also equals its prompts run alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from glm_image.engine import DitEngine

SIZE = 64  # pixels: a 4x4 grid of DiT image tokens
IMAGE_TOKENS = (SIZE // 16) ** 2


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The batched path (what an accelerator runs): these tests count the rows and keys of one
    forward, which a CPU's default (each image apart, ``batch_invariant``) never batches."""
    return DitEngine.from_pretrained(tiny_checkpoint, batch_invariant=False)


@pytest.fixture
def calls(engine, monkeypatch):
    """Every attention call of the model: (mask, rows, keys, output finite)."""
    seen = []
    attention = engine.model.ops.attention

    def record(q, k, v, *, mask, scale):
        out = attention(q, k, v, mask=mask, scale=scale)
        seen.append((mask, q.shape[0], k.shape[2], bool(torch.isfinite(out).all())))
        return out

    monkeypatch.setattr(engine.model.ops, "attention", record)
    return seen


def _condition(seed, height=SIZE, width=SIZE):
    """A condition image with its grid of VQ codes (32 pixels a code; the DiT sees 4 keys a code)."""
    g = torch.Generator().manual_seed(seed)
    image = Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())
    grid = (height // 32, width // 32)
    return image, torch.randint(0, 16384, (grid[0] * grid[1],), generator=g), grid


def _conditions(sizes):
    """Per prompt, its condition images of the given (height, width)."""
    if sizes is None:
        return None
    return [[_condition(10 * i + j, *size) for j, size in enumerate(own)] for i, own in enumerate(sizes)]


def _cache_keys(condition):
    return 4 * condition[1].numel()


def _expected_calls(engine, prompts, isolate, conditions, guidance):
    """(rows, keys) per attention call of one layer, from first principles: a conditional row sees
    its prompt's glyphs (all prompts' longest when not isolated) and, with images, its cache keys;
    an unconditional row sees the glyphs of ""; consecutive rows that see as many keys share a call."""
    _, lengths = engine.glyph.encode(prompts, return_lengths=True)
    _, (empty,) = engine.glyph.encode([""], return_lengths=True)
    caches = [sum(map(_cache_keys, own)) for own in conditions] if conditions else [0] * len(prompts)
    rows = [
        (length if isolate else max(lengths), cache) for length, cache in zip(lengths, caches, strict=True)
    ]
    if guidance > 1:
        rows += [(empty, 0)] * len(prompts)
    runs = []
    for row in rows:
        if runs and runs[-1][0] == row:
            runs[-1][1] += 1
        else:
            runs.append([row, 1])
    return [(count, cache + text + IMAGE_TOKENS) for (text, cache), count in runs]


TWO = ["'BLUE'", "a sign that says 'a much longer text'"]
CASES = {  # prompts, isolate_prompts, each prompt's condition image sizes, guidance
    "no quotes": (["a plain street"], True, None, 1.5),
    "quoted": (["a sign that says 'OPEN'"], True, None, 1.5),
    "prompts isolated": (["'OPEN'", "「春节快乐」 and 'a'", "no quotes"], True, None, 1.5),
    "prompts as the reference": (["'OPEN'", "「春节快乐」 and 'a'", "no quotes"], False, None, 1.5),
    "image, no quotes": (["make it blue"], True, [[(64, 64)]], 1.5),
    "image, quoted": (["make the sign say 'BLUE'"], True, [[(64, 64)]], 1.5),
    "images, prompts": (TWO, True, [[(64, 64)], [(64, 64)]], 1.5),
    "images of two sizes, one length": (["'BLUE'", "'BLUE'"], True, [[(64, 64)], [(64, 96)]], 1.5),
    "two images each": (TWO, True, [[(64, 64), (32, 64)], [(64, 64), (32, 64)]], 1.5),
    "image, no guidance": (["make the sign say 'BLUE'"], True, [[(64, 64)]], 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_denoise_attends_without_a_mask(engine, calls, case):
    prompts, isolate, sizes, guidance = CASES[case]
    prior = torch.randint(0, 16384, (len(prompts), IMAGE_TOKENS), generator=torch.Generator().manual_seed(1))
    conditions = _conditions(sizes)
    engine.denoise(
        prior, prompts, SIZE, SIZE, 1, guidance, seeds=list(range(len(prompts))),
        conditions=conditions, isolate_prompts=isolate,
    )  # fmt: skip
    assert calls and all(mask is None for mask, *_ in calls)
    assert all(finite for *_, finite in calls), "padding queries must stay finite"
    layers = engine.config.dit.num_layers
    expected = _expected_calls(engine, prompts, isolate, conditions, guidance)
    step = [(rows, keys) for _, rows, keys, _ in calls[-layers * len(expected) :]]
    assert step == expected * layers
    # before the step, one forward (B=1) per condition image writes the cache
    writes = [(1, _cache_keys(c)) for own in conditions or [] for c in own for _ in range(layers)]
    assert [(rows, keys) for _, rows, keys, _ in calls[: -layers * len(expected)]] == writes


@pytest.mark.parametrize("case", ["images, prompts", "images of two sizes, one length"])
def test_a_batch_with_images_equals_its_prompts_alone(engine, case):
    """Prompts of different glyph lengths, or condition images of different sizes, each prompt
    reading its own: every image equals what its prompt gives alone."""
    prompts, _, sizes, _ = CASES[case]
    prior = torch.randint(0, 16384, (2, IMAGE_TOKENS), generator=torch.Generator().manual_seed(2))
    conditions = _conditions(sizes)
    both = engine.denoise(prior, prompts, SIZE, SIZE, 2, seeds=[5, 6], conditions=conditions)
    for i, prompt in enumerate(prompts):
        alone = engine.denoise(
            prior[i : i + 1], prompt, SIZE, SIZE, 2, seeds=[5 + i], conditions=[conditions[i]]
        )
        torch.testing.assert_close(both[i : i + 1], alone, rtol=0, atol=1e-5)
