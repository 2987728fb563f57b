"""The Jacobi options (coupled drafts, continuation, spatial first drafts) are exact.

Exhaustively: every sequence of a 3-token vocabulary gets its exact probability from the engine's
composition of ``verify`` and ``jacobi_drafts``, with each option, including the coupling that
reuses a position's uniform across iterations. That uniform is a hidden state, so the
enumeration carries, per draft, the interval of [0, 1) its uniform is known to lie in, and cuts
it further at every cumulative sum a later draw could use (conditional weight: the piece's share
of the interval); every other uniform is fresh and cut as in ``test_speculative``. The same
computation shows a deliberately wrong variant. Then on the engine: greedy tokens stay the
sequential ones, batches, the static step and the histogram; and a chi-square test against
sequential sampling on the sharpened model.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest
import torch
from test_jacobi import (  # noqa: F401
    PROMPTS,
    SAMPLES,
    _chi_square_p,
    _same_distribution,
    _sample,
    _sequential,
    sharp_engine,
)
from test_speculative import LENGTH, VOCAB, WINDOW, TableModel, _accept_cells, _cells, _residual

from glm_image.engine import jacobi
from glm_image.errors import GlmImageError
from glm_image.sampling.speculative import jacobi_drafts, verify

D = WINDOW - 1


def _pieces(interval, *dists):
    """(midpoint, conditional weight, piece) of ``interval`` cut at the dists' cumulative sums."""
    lo, hi = interval
    cuts = {lo, hi}
    for d in dists:
        if d.sum() > 0:
            cuts.update(c for c in np.cumsum(d / d.sum())[:-1].tolist() if lo < c < hi)
    cuts = sorted(cuts)
    return [((a + b) / 2, (b - a) / (hi - lo), (a, b)) for a, b in itertools.pairwise(cuts) if b - a > 1e-15]


def _renewal_cells(p, q, drafts, c, init_of, coupled, continued, interval_of):
    """Per next draft i: its cells (u, keep_u, draw_u, weight, interval). Every distribution the
    renewal may draw position i from is cut at (its new p or init, and the residual against its
    old q), whichever option is on, so the engine's output is constant on each cell."""
    t = len(drafts) + 1
    out = []
    for i in range(D):
        s = c + i
        new = p[s] if s < t else init_of(i)
        dists = [new]
        keeps = [(0.5, 1.0)]
        draws = [(0.5, 1.0)]
        if s < t - 1:  # holds an unverified draft
            dists.append(_residual(new, q[s]))
            if continued:
                x = drafts[s]
                keeps = [(u, w) for u, w, _ in _accept_cells(new[x] / q[s][x])]
                draws = _cells(_residual(new, q[s]), new)
        us = _pieces(interval_of(i), *dists) if coupled else [(u, w, None) for u, w in _cells(*dists)]
        out.append(
            [
                (u, k, r, wu * wk * wr, piece)
                for (u, wu, piece), (k, wk), (r, wr) in itertools.product(us, keeps, draws)
            ]
        )
    return out


def _options_distribution(model, coupled, continued, drafts_fn=jacobi_drafts, lag=None):
    """The exact distribution of the sequences the engine's loop writes with these options:
    verify, the cap at the length, then ``jacobi_drafts`` with the engine's uniforms (the
    positions' own with ``coupled``, and the continuation's fresh ones). ``lag``: a first
    draft at position k copies the accepted token at k - lag, as ``above`` copies the token a
    grid row back and ``preview`` one of the preview (``JacobiLoop._init``: a point mass that
    depends on the sequence so far); where that token is not accepted yet, the model's init."""
    # state: (prefix, drafts, q bytes, intervals of the drafts' uniforms) -> probability
    states = {((), (), np.zeros((0, VOCAB)).tobytes(), ()): 1.0}
    done: dict[tuple[int, ...], float] = defaultdict(float)
    while states:
        outcomes = []  # verify, batched over the fresh uniforms' cells
        for (prefix, drafts, q_bytes, intervals), weight in states.items():
            q = np.frombuffer(q_bytes).reshape(-1, VOCAB)
            t = len(drafts) + 1
            p = np.stack([model.table[prefix + drafts[:j]] for j in range(t)])
            accept = [_accept_cells(p[j, x] / q[j, x]) for j, x in enumerate(drafts)]
            draws = _cells(*p, *(_residual(p[j], q[j]) for j in range(t - 1)))
            for a in itertools.product(*accept):
                for u_draw, w_draw in draws:
                    u = [c[0] for c in a] + [u_draw]
                    w = weight * np.prod([c[1] for c in a]) * w_draw
                    outcomes.append((prefix, drafts, q, intervals, p, u, w))
        nxt: dict = defaultdict(float)
        for t in sorted({len(o[1]) + 1 for o in outcomes}):
            group = [o for o in outcomes if len(o[1]) + 1 == t]
            p = torch.tensor(np.stack([o[4] for o in group]))
            q = torch.tensor(np.stack([o[2] for o in group])).reshape(len(group), t - 1, VOCAB)
            drafts = torch.tensor([o[1] for o in group], dtype=torch.long).reshape(len(group), t - 1)
            u = torch.tensor([o[5] for o in group])
            count, tokens = verify(p, q, drafts, u[:, : t - 1], u[:, t - 1])
            n = torch.tensor([len(o[0]) for o in group])
            count = torch.minimum(count, LENGTH - n)
            rows = []  # the renewal, batched over its cells
            for o, c, tok in zip(group, count.tolist(), tokens.tolist(), strict=True):
                prefix = o[0] + tuple(tok[:c])
                if len(prefix) == LENGTH:
                    done[prefix] += o[6]
                    continue

                def init_of(i, o=o, prefix=prefix):
                    k = len(prefix) + i
                    if lag is not None and 0 <= k - lag < len(prefix):
                        return np.eye(VOCAB)[prefix[k - lag]]
                    init = model.init[k]
                    return o[4][-1] if init is None else init

                def interval_of(i, o=o, c=c, t=t):  # the uniform of a position drafted before keeps its piece
                    return o[3][c + i] if c + i < t - 1 else (0.0, 1.0)

                init = np.stack([init_of(i) for i in range(D)])
                cells = _renewal_cells(o[4], o[2], o[1], c, init_of, coupled, continued, interval_of)
                for combo in itertools.product(*cells):
                    rows.append((o, c, prefix, init, combo))
            if not rows:
                continue
            pr = torch.tensor(np.stack([r[0][4] for r in rows]))
            carry = {}
            if continued:
                carry = {
                    "old": torch.tensor([r[0][1] for r in rows], dtype=torch.long).reshape(len(rows), t - 1),
                    "q_old": torch.tensor(np.stack([r[0][2] for r in rows])).reshape(len(rows), t - 1, VOCAB),
                    "keep_u": torch.tensor([[cell[1] for cell in r[4]] for r in rows]),
                    "draw_u": torch.tensor([[cell[2] for cell in r[4]] for r in rows]),
                }
            new_drafts, new_q = drafts_fn(
                pr,
                torch.tensor([r[1] for r in rows]),
                torch.tensor(np.stack([r[3] for r in rows])),
                torch.tensor([[cell[0] for cell in r[4]] for r in rows]),
                **carry,
            )
            for r, dr, nq in zip(rows, new_drafts.tolist(), new_q.numpy(), strict=True):
                w = r[0][6] * np.prod([cell[3] for cell in r[4]])
                intervals = tuple(cell[4] for cell in r[4]) if coupled else ()
                nxt[(r[2], tuple(dr), nq.tobytes(), intervals)] += w
        states = nxt
    return done


def _max_error(model, got):
    expected = model.joint()
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
    return max(abs(got.get(s, 0.0) - p) for s, p in expected.items())


OPTIONS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize(("coupled", "continued"), OPTIONS)
@pytest.mark.parametrize("seed", range(3))
def test_each_option_writes_exactly_the_models_joint_distribution(seed, coupled, continued):
    """TableModel's first drafts mix the window's last distribution, point masses (as ``above``
    and ``preview`` copy a token) and other distributions, so every draft source is covered."""
    model = TableModel(seed)
    assert _max_error(model, _options_distribution(model, coupled, continued)) < 1e-6


@pytest.mark.parametrize(("coupled", "continued"), OPTIONS)
@pytest.mark.parametrize("lag", [1, 2])
def test_spatial_first_drafts_keep_each_option_exact(lag, coupled, continued):
    """First drafts copied from the accepted sequence (``above``, ``preview``) with each renewal,
    the coupling across iterations included: lag 2 copies at every position past the first two,
    lag 1 only at the window's first draft (the next one's source is not accepted yet)."""
    model = TableModel(lag + 2 * coupled + continued)
    got = _options_distribution(model, coupled, continued, lag=lag)
    assert _max_error(model, got) < 1e-6


def test_the_exhaustive_check_catches_a_mislabelled_copy():
    """A copied first draft verified as if drawn from the window's last distribution (the draft
    is the copy, its q claims otherwise): off by more than 1e-3."""

    def mislabelled(p, count, init, u, **carry):
        drafts, q = jacobi_drafts(p, count, init, u, **carry)
        copied = init.amax(dim=-1) == 1  # (B, D) a point mass
        fresh = count.unsqueeze(1) + torch.arange(init.shape[1]) >= p.shape[1]  # not computed
        return drafts, torch.where((copied & fresh).unsqueeze(-1), p[:, -1:].expand_as(q), q)

    errors = [
        _max_error(m, _options_distribution(m, coupled, True, mislabelled, lag=2))
        for m, coupled in ((TableModel(0), False), (TableModel(1), True))
    ]
    assert max(errors) > 1e-3, errors


def test_the_coupling_does_keep_drafts():
    """The coupled renewals do what they are for: a draft whose distribution did not change is
    kept, where an independent redraw would move it."""
    p = torch.tensor([[[0.5, 0.3, 0.2]] * 3], dtype=torch.float64)
    old, q_old = torch.tensor([[2, 2]]), p[:, :2].clone()
    count, init = torch.tensor([1]), p[:, :2].clone()
    kept, _ = jacobi_drafts(
        p, count, init, torch.tensor([[0.1, 0.1]]), old=old, q_old=q_old,
        keep_u=torch.tensor([[0.999, 0.999]]), draw_u=torch.tensor([[0.0, 0.0]]),
    )  # fmt: skip
    assert kept[0, 0] == 2  # position 1 held draft 2 and its distribution is unchanged
    fresh, _ = jacobi_drafts(p, count, init, torch.tensor([[0.1, 0.1]]))
    assert fresh[0, 0] == 0


@pytest.mark.parametrize("wrong", ["residual reuses the noise", "always keep"])
def test_the_exhaustive_check_catches_a_wrong_continuation(wrong):
    """A continuation whose residual draw reuses the position's uniform (which made the draft:
    given it, the uniform is no longer uniform), or one that keeps every old draft but claims
    its new distribution: both are off by more than 1e-3 somewhere (the exact options: below 1e-6;
    both numbers are computed, not sampled)."""

    def reuse(p, count, init, u, **carry):
        return jacobi_drafts(p, count, init, u, **(carry | {"draw_u": u}))

    def keep(p, count, init, u, **carry):
        return jacobi_drafts(p, count, init, u, **(carry | {"keep_u": torch.zeros_like(u)}))

    errors = [
        _max_error(m, _options_distribution(m, True, True, reuse if wrong.startswith("residual") else keep))
        for m in (TableModel(0), TableModel(1))
    ]
    assert max(errors) > 1e-3, errors


# ------------------------------------------------------------------ on the engine


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from glm_image.engine import ArEngine

    return ArEngine.from_pretrained(tiny_checkpoint)


def _run(engine, prompts, *, coupled, continued, drafts="last", window=4, **kwargs):
    return engine.generate(
        prompts, 128, 192, decoding="jacobi", jacobi_window=window, jacobi_drafts=drafts,
        jacobi_coupled=coupled, jacobi_continued=continued, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("coupled", "continued", "drafts"), [(True, True, "preview"), (True, False, "above")]
)
def test_greedy_tokens_stay_the_sequential_ones(engine, coupled, continued, drafts):
    call = {"greedy": True, "num_images_per_prompt": 2, "max_new_tokens": 260}
    sequential = engine.generate(PROMPTS, 128, 192, **call).tokens
    out = _run(engine, PROMPTS, coupled=coupled, continued=continued, drafts=drafts, **call)
    assert torch.equal(out.tokens, sequential)


@pytest.mark.parametrize(
    ("coupled", "continued", "drafts"),
    [(True, False, "above"), (False, True, "above"), (True, True, "preview")],
)
def test_options_hold_in_a_batch_and_on_the_static_step(engine, coupled, continued, drafts, monkeypatch):
    """Each row alone equals its row of a batch decoded together (rows not decoded apart), and
    the capturable step equals the eager one; the histogram adds up to forwards and tokens.

    The steps are compared with attention reading the whole cache in both (the eager step reads
    it only up to its furthest window): ATen's attention kernel rounds a row's last bit differently with the
    number of masked keys that trail it (``ar_engine``'s docstring), and a draft drawn by the
    inverse CDF from the random model's near-uniform distribution over 16512 tokens turns a last
    bit into another draft about once in a hundred draws (seen on an Intel Xeon, AVX-512). What
    is compared is the loops: no host read per iteration, iterations queued unread, finished
    rows that run on, the uniform stream's refills."""
    call = {"seeds": [3, 8], "max_new_tokens": 40, "coupled": coupled, "continued": continued}
    call["drafts"] = drafts
    monkeypatch.setattr(engine, "batch_invariant", False)
    together = _run(engine, PROMPTS, **call)
    for i, (prompt, seed) in enumerate(zip(PROMPTS, [3, 8], strict=True)):
        alone = _run(engine, prompt, **(call | {"seeds": [seed]}))
        assert torch.equal(alone.tokens[0], together.tokens[i])
    whole = engine.model.ops.window_attention
    monkeypatch.setattr(engine.model.ops, "window_attention", lambda *a, length=None, **k: whole(*a, **k))
    together = _run(engine, PROMPTS, **call)
    monkeypatch.setattr(engine, "decode_step", "static")
    static = _run(engine, PROMPTS, **call)
    assert torch.equal(static.tokens, together.tokens)
    assert static.stats.accepted == together.stats.accepted
    for forwards, histogram in zip(together.stats.image_forwards, together.stats.accepted, strict=True):
        assert len(histogram) == 5 and histogram[0] == 0
        assert sum(histogram) == forwards
        assert sum(k * n for k, n in enumerate(histogram)) == 40


def test_options_on_int8_weights(tiny_checkpoint, monkeypatch):
    """Quantized weights change the logits, never the options: greedy tokens with every option
    on equal int8 sequential decoding's over the whole protocol (the preview copied into the
    target grid included), and sampled rows decoded together equal their runs alone."""
    from glm_image.engine import ArEngine

    engine = ArEngine.from_pretrained(tiny_checkpoint, quantize="int8")
    every = {
        "decoding": "jacobi",
        "jacobi_drafts": "preview",
        "jacobi_coupled": True,
        "jacobi_continued": True,
    }
    greedy = {"greedy": True, "num_images_per_prompt": 2}
    sequential = engine.generate(PROMPTS, 64, 64, **greedy)
    assert sequential.spec.target_offset > 0  # the preview grid, then the target grid
    assert torch.equal(engine.generate(PROMPTS, 64, 64, **every, **greedy).tokens, sequential.tokens)
    monkeypatch.setattr(engine, "batch_invariant", False)
    together = engine.generate(PROMPTS, 64, 64, **every, seeds=[4, 9], max_new_tokens=30)
    alone = engine.generate(PROMPTS[1], 64, 64, **every, seeds=[9], max_new_tokens=30)
    assert torch.equal(alone.tokens[0], together.tokens[1])


def test_options_change_the_draws_but_not_the_seeded_determinism(engine):
    a = _run(engine, PROMPTS[0], coupled=True, continued=True, seeds=[5], max_new_tokens=30)
    b = _run(engine, PROMPTS[0], coupled=True, continued=True, seeds=[5], max_new_tokens=30)
    c = _run(engine, PROMPTS[0], coupled=False, continued=False, seeds=[5], max_new_tokens=30)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"jacobi_coupled": "yes"}, "jacobi_coupled = 'yes'; allowed: true or false"),
        ({"jacobi_continued": 1}, "jacobi_continued = 1; allowed: true or false"),
    ],
)
def test_bad_options_name_the_field(engine, kwargs, message):
    with pytest.raises(GlmImageError, match=message):
        engine.generate(PROMPTS[0], 64, 64, decoding="jacobi", max_new_tokens=4, **kwargs)


# ------------------------------------------------------------------ sampling on the sharpened model


@pytest.mark.slow
def test_each_option_samples_the_sequential_distribution(sharp_engine, monkeypatch):  # noqa: F811
    """Chi-square against sequential sampling, per option (first drafts from two tokens back,
    a point mass, for half the runs: ``above``'s kind); a coupling whose acceptance tests reuse
    the drafts' own uniforms (the trap the module docstring names) is rejected by the same test."""
    from test_jacobi import BATCH
    from test_jacobi import LENGTH as N
    from test_jacobi import WINDOW as W

    engine, call = sharp_engine, {"num_images_per_prompt": BATCH, "max_new_tokens": N}
    sequential = _sequential(engine, call, monkeypatch)

    def runner(coupled, continued):
        def run(seed):
            return engine.generate(
                PROMPTS[0], 64, 64, seeds=seed, decoding="jacobi", jacobi_window=W,
                jacobi_coupled=coupled, jacobi_continued=continued, **call,
            ).tokens  # fmt: skip

        return run

    for k, (coupled, continued) in enumerate(OPTIONS[1:], start=1):
        with monkeypatch.context() as patch:
            first = _sample(runner(coupled, continued), 10**6 * k, SAMPLES // 2)
            patch.setattr(jacobi, "draft_sources", lambda spec, n, init: (torch.arange(n) - 2).clamp(min=-1))
            second = _sample(runner(coupled, continued), 10**6 * k + 5 * 10**5, SAMPLES // 2)
        same, p_min, tests = _same_distribution(sequential, torch.cat([first, second]))
        assert tests >= 2 * N - 3
        assert same, f"coupled={coupled} continued={continued}: p = {p_min:.2e} over {tests} tests"

    original = jacobi.JacobiLoop._uniforms

    def noise_in_the_test(self):  # the acceptance tests read the drafts' own uniforms
        u = original(self).clone()
        d = self.window - 1
        u[:, :d] = self.noise.gather(1, self.accepted.unsqueeze(1) + self.offsets[:d])
        return u

    monkeypatch.setattr(jacobi.JacobiLoop, "_uniforms", noise_in_the_test)
    same, p_min, _ = _same_distribution(sequential, _sample(runner(True, False), 9 * 10**6, SAMPLES))
    assert not same and p_min < 1e-6, f"the test cannot tell a wrong coupling: p = {p_min:.2e}"


def test_bench_ar_reports_a_histogram_per_option(tiny_checkpoint, capsys):
    """``bench ar --jacobi-options``: one row per option, each with its accepted-tokens
    histogram (forwards and tokens add up), on int8 weights (the options never touch them)."""
    from glm_image.bench.ar import ArBenchOptions, format_ar, run_ar
    from glm_image.cli import main

    options = ArBenchOptions(
        model=str(tiny_checkpoint), size=(64, 64), repeats=1, device="cpu", quantize="int8",
        max_tokens=12, decodings=("sequential", "jacobi"), windows=(4,),
        jacobi_options=("plain", "continued", "coupled+continued"), compare_reference=False,
    )  # fmt: skip
    report = run_ar(options)
    rows = {r["decoder"]: r for r in report["results"]}
    assert list(rows) == [
        "sequential",
        "jacobi W=4 plain",
        "jacobi W=4 continued",
        "jacobi W=4 coupled+continued",
    ]
    assert rows["sequential"]["accepted_histogram"] is None
    for name in list(rows)[1:]:
        histogram = rows[name]["accepted_histogram"]
        assert len(histogram) == 5 and histogram[0] == 0
        assert sum(histogram) == rows[name]["forwards_per_image"]  # one image
        assert sum(k * n for k, n in enumerate(histogram)) == 12
    assert report["config"]["jacobi_options"]["continued"] == {"coupled": False, "continued": True}
    text = format_ar(report)
    assert "- jacobi W=4 continued (T=0.9): forwards by tokens accepted 1..W: 1: " in text
    assert main(["bench", "ar", "--model", str(tiny_checkpoint), "--jacobi-options", "fast"]) == 2
    assert "--jacobi-options = fast; allowed: default, plain, coupled, continued" in capsys.readouterr().err
