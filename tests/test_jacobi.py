"""Speculative Jacobi decoding on the tiny checkpoint: greedy tokens equal sequential decoding and
transformers' ``generate``; sampled sequences have the distribution of sequential sampling."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import pytest
import torch

from glm_image.engine import ArEngine, jacobi
from glm_image.engine.choices import DEFAULT_WINDOW
from glm_image.engine.protocol import GridSpec
from glm_image.errors import GlmImageError
from glm_image.sampling import SamplingParams
from glm_image.sampling.speculative import verify
from glm_image.synthetic import sharpen_ar

PROMPTS = ["A storefront sign that says 'OPEN'", "一张海报，标题写着「春节快乐」，背景是红色的灯笼"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return ArEngine.from_pretrained(tiny_checkpoint)


def _jacobi(engine, prompts, height, width, *, window=DEFAULT_WINDOW, drafts="last", **kwargs):
    return engine.generate(
        prompts, height, width, decoding="jacobi", jacobi_window=window, jacobi_drafts=drafts, **kwargs
    )


# ------------------------------------------------------------------ greedy: the same tokens


@pytest.mark.parametrize(("height", "width"), [(128, 128), (128, 192)])
def test_greedy_jacobi_writes_the_sequential_and_the_reference_tokens(
    engine, reference_pipeline, height, width
):
    """The whole protocol (preview, target grid, EOS as the reference writes it), a batch of an
    English and a Chinese prompt (different lengths: left padding) with 2 images each."""
    call = {"greedy": True, "constrain_grid": False, "include_eos": True, "num_images_per_prompt": 2}
    sequential = engine.generate(PROMPTS, height, width, **call).tokens
    out = _jacobi(engine, PROMPTS, height, width, **call)
    assert torch.equal(out.tokens, sequential)
    assert out.tokens.shape[1] == out.spec.num_tokens + 1
    for i, prompt in enumerate(PROMPTS):
        inputs = engine.processor_inputs(prompt, height, width)
        with torch.no_grad():
            reference = reference_pipeline.vision_language_encoder.generate(
                **inputs, max_new_tokens=out.spec.num_tokens + 1, do_sample=False
            )
        generated = reference[0, inputs["input_ids"].shape[1] :]
        assert len(generated) >= out.spec.num_tokens, "the reference writes whole grids here"
        assert torch.equal(out.tokens[2 * i, : len(generated)], generated)
        # generate stops once every sequence ended; past that point both decoders write padding
        assert (out.tokens[2 * i, len(generated) :] == engine.config.generation.pad_token_id).all()
        assert torch.equal(out.tokens[2 * i + 1], out.tokens[2 * i])
    stats = out.stats
    assert stats.decoding == "jacobi" and stats.tokens == out.spec.num_tokens + 1
    assert stats.forwards == max(stats.image_forwards) and stats.tokens_per_forward >= 1
    assert all(f <= stats.tokens for f in stats.image_forwards)  # never more forwards than tokens


@pytest.fixture(scope="module")
def greedy_reference(engine):
    """Sequential greedy tokens of both prompts, 2 images each, into the target grid."""
    return engine.generate(PROMPTS, 128, 192, greedy=True, num_images_per_prompt=2, max_new_tokens=260).tokens


@pytest.mark.parametrize(
    ("window", "drafts", "tokens"), [(1, "last", 30), (3, "above", 260), (5, "preview", 260)]
)
def test_greedy_tokens_do_not_depend_on_the_window_or_the_drafts(
    engine, greedy_reference, window, drafts, tokens
):
    """Any window, any initial drafts (the target grid starts at token 247 here): the same tokens."""
    call = {"greedy": True, "num_images_per_prompt": 2, "max_new_tokens": tokens}
    out = _jacobi(engine, PROMPTS, 128, 192, window=window, drafts=drafts, **call)
    assert torch.equal(out.tokens, greedy_reference[:, :tokens])
    if window == 1:  # no drafts: one token per forward, exactly sequential decoding
        assert out.stats.image_forwards == (tokens,) * 4


# ------------------------------------------------------------------ the loop's mechanics


def test_each_image_is_the_same_alone_as_in_a_batch(engine):
    """Per-row offsets, slots, masks and uniforms: a row never sees another row's state."""
    call = {"max_new_tokens": 40, "window": 4}
    batched = _jacobi(engine, PROMPTS, 128, 192, seeds=[11, 12, 13, 14], num_images_per_prompt=2, **call)
    for i, seed in enumerate([11, 12, 13, 14]):
        alone = _jacobi(engine, PROMPTS[i // 2], 128, 192, seeds=[seed], **call)
        assert torch.equal(batched.tokens[i], alone.tokens[0])
    assert not torch.equal(batched.tokens[0], batched.tokens[1]), "each image has its own seed"
    assert len(set(batched.stats.image_forwards)) > 1, "rows advanced by their own counts"


@pytest.mark.parametrize("greedy", [True, False])
def test_the_capturable_step_equals_the_eager_step(engine, greedy, monkeypatch):
    """What a device graph replays (no host-side bound on the cache) gives the eager tokens."""
    call = {"seeds": [4, 9], "greedy": greedy, "max_new_tokens": 30, "window": 4}
    eager = _jacobi(engine, PROMPTS, 128, 192, **call)
    monkeypatch.setattr(engine, "decode_step", "static")
    static = _jacobi(engine, PROMPTS, 128, 192, **call)
    assert (eager.decode_step, static.decode_step) == ("eager", "static")
    assert torch.equal(static.tokens, eager.tokens)
    assert static.stats.forwards == eager.stats.forwards
    assert static.stats.image_forwards == eager.stats.image_forwards
    # eager reads the furthest row before every iteration; the static step only when the slowest
    # row could be done (a row r tokens short needs at least ceil(r / window) more iterations)
    assert eager.stats.host_reads == eager.stats.forwards
    assert static.stats.host_reads < eager.stats.host_reads / 2, static.stats
    monkeypatch.setattr(engine, "decode_step", "graph")  # never a silent fallback
    with pytest.raises(GlmImageError, match=r"decode_step = 'graph'.*cpu has no graph API"):
        _jacobi(engine, PROMPTS, 128, 192, **call)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_captured_iteration_replays_the_eager_tokens(engine, greedy, monkeypatch):
    """The graph path without a GPU: a stand-in for ``graphs.capture`` that keeps its contract
    (the step runs for real before the reset, here twice: warm-up and capture) and replays the
    step. The reset must undo both, so the replays write the eager tokens."""
    from glm_image.engine import graphs
    from glm_image.engine.graphs import Captured

    def capture(step, device, *, reset):
        step()
        step()
        reset()
        return Captured(step, lambda: None)

    call = {"seeds": [5, 6], "greedy": greedy, "max_new_tokens": 30, "window": 4}
    eager = _jacobi(engine, PROMPTS, 128, 192, **call)
    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(engine, "decode_step", "graph")
    replayed = _jacobi(engine, PROMPTS, 128, 192, **call)
    assert replayed.decode_step == "graph" and torch.equal(replayed.tokens, eager.tokens)
    assert dataclasses.replace(replayed.stats, host_reads=None) == dataclasses.replace(
        eager.stats, host_reads=None
    )
    assert replayed.stats.host_reads < eager.stats.host_reads  # the host queues replays unread
    monkeypatch.setattr(graphs, "capture", lambda step, device, reset: "capture failed: not here")
    with pytest.raises(GlmImageError, match=r"cannot be captured \(capture failed: not here\)"):
        _jacobi(engine, PROMPTS, 128, 192, **call)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("greedy", [True, False])
def test_cuda_graph_jacobi_equals_eager(tiny_checkpoint, greedy):
    cuda = ArEngine.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.float32)
    call = {"seeds": [4, 9], "greedy": greedy, "max_new_tokens": 120, "window": 8}
    results = {}
    for step in ("eager", "graph"):
        cuda.decode_step = step
        results[step] = _jacobi(cuda, PROMPTS, 128, 192, **call)
    assert results["graph"].decode_step == "graph"
    assert torch.equal(results["graph"].tokens, results["eager"].tokens)


def test_image_to_image_greedy_equals_sequential(engine):
    """No preview grid: the target grid comes right after the condition image's tokens."""
    from PIL import Image

    pixels = (torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    call = {"images": [[Image.fromarray(pixels.numpy())]], "greedy": True}
    sequential = engine.generate("make the sign say 'BLUE'", 128, 96, **call)
    out = _jacobi(engine, "make the sign say 'BLUE'", 128, 96, window=4, drafts="preview", **call)
    assert out.spec.preview is None and torch.equal(out.tokens, sequential.tokens)
    assert torch.equal(out.prior_tokens, sequential.prior_tokens)


def test_stopping_early_keeps_the_same_first_tokens(engine):
    long = _jacobi(engine, PROMPTS[0], 128, 192, seeds=[3], max_new_tokens=45, window=4)
    short = _jacobi(engine, PROMPTS[0], 128, 192, seeds=[3], max_new_tokens=17, window=4)
    assert short.tokens.shape == (1, 17) and torch.equal(short.tokens, long.tokens[:, :17])


def test_draft_sources_copy_the_row_above_or_the_preview():
    spec = GridSpec(target=(4, 6), preview=(2, 3))  # preview 2x3 (6 tokens), then the 4x6 target
    above = jacobi.draft_sources(spec, 32, "above").tolist()
    assert above[:6] == [-1, -1, -1, 0, 1, 2]
    assert above[6:12] == [-1] * 6 and above[12:18] == list(range(6, 12)) and above[30:] == [-1, -1]
    preview = jacobi.draft_sources(spec, 32, "preview").tolist()
    assert preview[:6] == above[:6]
    # target cell (r, c) copies preview cell (r * 2 // 4, c * 3 // 6)
    assert preview[6:30] == [(r // 2) * 3 + c // 2 for r in range(4) for c in range(6)]
    assert set(jacobi.draft_sources(spec, 32, "last").tolist()) == {-1}


def test_sequential_decoding_counts_one_forward_per_token(engine):
    stats = engine.generate(PROMPTS, 64, 64, seeds=[1, 2], max_new_tokens=9).stats
    assert (stats.decoding, stats.forwards, stats.image_forwards, stats.tokens) == (
        "sequential",
        9,
        (9, 9),
        9,
    )
    assert stats.tokens_per_forward == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"jacobi_window": 0}, "jacobi_window = 0; allowed: an integer from 1 to 64"),
        ({"jacobi_window": 2.5}, "jacobi_window = 2.5; allowed: an integer from 1 to 64"),
        ({"jacobi_drafts": "random"}, "jacobi_drafts = 'random'; allowed: last, above, preview"),
        ({"decoding": "fast"}, "decoding = 'fast'; allowed: sequential, jacobi"),
        ({"return_logits": True}, "return_logits: .* decoding='sequential' only"),
    ],
)
def test_bad_options_name_the_field(engine, kwargs, message):
    call = {"decoding": "jacobi", "max_new_tokens": 4} | kwargs
    with pytest.raises(GlmImageError, match=message):
        engine.generate(PROMPTS[0], 64, 64, **call)


# ------------------------------------------------------------------ sampling: the same distribution

# A synthetic checkpoint whose AR distributions are sharp (16 codes hold most of the mass, so a
# position has a handful of likely tokens: the chi-square cells fill) and only moderately
# context-dependent (a shared component in every token embedding), so drafts are often accepted
# (about 1.8 tokens per forward at W = 3) and a wrong acceptance rule still shows.
SHARP_CODES, SHARP_SCALE = 16, 6.0
# 1000 samples a side (500 for a wrong rule): the deliberately wrong rules here and in
# test_jacobi_options are rejected at p = 2e-22 and 5e-13 (the tests ask for 1e-6), the exact
# options accepted at p >= 0.05 against Bonferroni's 1.1e-4 (measured; 2000 a side took twice as long)
SAMPLES, BATCH, LENGTH, WINDOW = 1000, 250, 5, 3
ALPHA = 0.001


@pytest.fixture(scope="module")
def sharp_engine(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharp") / "tiny-sharp"
    root = sharpen_ar(tiny_checkpoint, out, codes=SHARP_CODES, scale=SHARP_SCALE)
    engine = ArEngine.from_pretrained(root)
    # the checkpoint's temperature; top-k instead of its top-p keeps the test fast (top-p sorts
    # 16512 logits per position) and still zeroes most of p
    engine.sampling = SamplingParams(temperature=0.9, top_k=8)
    return engine


def _chi_square_p(a: Counter, b: Counter) -> float | None:
    """Two-sample chi-square test of homogeneity; cells expected below 5 are pooled (into the
    smallest kept cell if the pool itself is too small). None when fewer than 2 cells remain."""
    na, nb = sum(a.values()), sum(b.values())
    need = 5.0 * (na + nb) / min(na, nb)  # a cell's total for both expected counts to reach 5
    keys = sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
    cells = [[a[k], b[k]] for k in keys if a[k] + b[k] >= need]
    pool = [sum(a[k] for k in keys if a[k] + b[k] < need), sum(b[k] for k in keys if a[k] + b[k] < need)]
    if sum(pool) >= need or (sum(pool) and not cells):
        cells.append(pool)
    elif sum(pool):
        cells[-1] = [cells[-1][0] + pool[0], cells[-1][1] + pool[1]]
    if len(cells) < 2:
        return None
    stat = 0.0
    for x, y in cells:
        ex, ey = na * (x + y) / (na + nb), nb * (x + y) / (na + nb)
        stat += (x - ex) ** 2 / ex + (y - ey) ** 2 / ey
    df = torch.tensor((len(cells) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))  # chi2 sf


def _same_distribution(x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float, int]:
    """Every position's marginal and every adjacent pair, Bonferroni over the tests made:
    (no test rejects at ALPHA, the smallest p-value, the number of tests)."""
    columns = [(x[:, i].tolist(), y[:, i].tolist()) for i in range(x.shape[1])]
    tables = [(Counter(a), Counter(b)) for a, b in columns]
    tables += [
        (Counter(zip(a0, a1, strict=True)), Counter(zip(b0, b1, strict=True)))
        for (a0, b0), (a1, b1) in itertools.pairwise(columns)
    ]
    p = [q for q in (_chi_square_p(a, b) for a, b in tables) if q is not None]
    return min(p) >= ALPHA / len(p), min(p), len(p)


def _sample(run, seed: int, count: int = SAMPLES) -> torch.Tensor:
    return torch.cat([run(seed + k * BATCH) for k in range(count // BATCH)])


def _sequential(engine, call: dict, monkeypatch) -> torch.Tensor:
    """The sequential samples the Jacobi ones are tested against: rows decoded together (their
    distribution needs no batch invariance, and together is faster here; a Jacobi batch waits for
    its slowest row, so those run apart)."""
    with monkeypatch.context() as patch:
        patch.setattr(engine, "batch_invariant", False)
        return _sample(lambda s: engine.generate(PROMPTS[0], 64, 64, seeds=s, **call).tokens, 0)


@pytest.mark.slow
def test_jacobi_sampling_has_the_distribution_of_sequential_sampling(sharp_engine, monkeypatch):
    engine, call = sharp_engine, {"num_images_per_prompt": BATCH, "max_new_tokens": LENGTH}
    sequential = _sequential(engine, call, monkeypatch)

    def run_jacobi(seed: int) -> torch.Tensor:
        return _jacobi(engine, PROMPTS[0], 64, 64, seeds=seed, window=WINDOW, **call).tokens

    with monkeypatch.context() as patch:  # half of the runs draft a point mass: two tokens back
        first = _sample(run_jacobi, 10**6, SAMPLES // 2)
        patch.setattr(jacobi, "draft_sources", lambda spec, n, init: (torch.arange(n) - 2).clamp(min=-1))
        second = _sample(run_jacobi, 2 * 10**6, SAMPLES // 2)
    same, p_min, tests = _same_distribution(sequential, torch.cat([first, second]))
    assert tests >= 2 * LENGTH - 3, "the sharp model should leave enough cells to test"
    assert same, f"jacobi differs from sequential sampling: p = {p_min:.2e} over {tests} tests"

    def accept_all(p, q, drafts, accept_u, draw_u):  # the deliberately wrong rule
        return verify(p, q, drafts, torch.zeros_like(accept_u), draw_u)

    monkeypatch.setattr(jacobi, "verify", accept_all)
    same, p_min, _ = _same_distribution(sequential, _sample(run_jacobi, 3 * 10**6, SAMPLES // 2))
    assert not same and p_min < 1e-6, f"the test cannot tell a wrong rule: p = {p_min:.2e}"
