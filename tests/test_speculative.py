"""Speculative verification and the Jacobi update are exact: their output distributions, computed
exhaustively (never sampled), equal the target distributions.

Every random choice of the functions is an inverse-CDF draw or a comparison with one uniform, so
each output is constant on cells of the uniforms' space. The tests cut [0, 1) at every value where
an output could change (the acceptance ratios, the cumulative sums of every distribution a draw
could use: an independent restatement, computed here in float64), evaluate the functions once at
each cell's midpoint (all cells in one batch) and weight the result by the cell's probability.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest
import torch

from glm_image.sampling.speculative import (
    categorical,
    greedy_drafts,
    greedy_verify,
    jacobi_drafts,
    verify,
)

V = 8


def _dist(rng: np.random.Generator, vocab: int, zeros: int = 0) -> np.ndarray:
    p = rng.gamma(0.7, size=vocab)
    p[rng.choice(vocab, zeros, replace=False)] = 0.0
    return p / p.sum()


def _cells(*dists: np.ndarray) -> list[tuple[float, float]]:
    """(midpoint, width) of the cells of [0, 1) cut at every cumulative sum of ``dists``."""
    cuts = {0.0, 1.0}
    for d in dists:
        if d.sum() > 0:
            cuts.update(np.cumsum(d / d.sum())[:-1].tolist())
    cuts = sorted(cuts)
    return [((a + b) / 2, b - a) for a, b in itertools.pairwise(cuts) if b - a > 1e-15]


def _accept_cells(ratio: float) -> list[tuple[float, float, bool]]:
    """The acceptance uniform's two cells: below the ratio (accept) and above it."""
    ratio = min(ratio, 1.0)
    cells = [(ratio / 2, ratio, True), ((1 + ratio) / 2, 1 - ratio, False)]
    return [c for c in cells if c[1] > 0]


def _residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    r = np.maximum(p - q, 0.0)
    return r / r.sum() if r.sum() > 0 else p


def _one_step_distribution(p0, q0, p1):
    """Exhaustive: a window of one draft (from q0) and the bonus position. Returns the
    distribution of the first token, and that of the bonus given that the draft was accepted."""
    rows, weights = [], []
    for x in np.flatnonzero(q0):
        ratio = p0[x] / q0[x]
        for u_accept, w_accept, _ in _accept_cells(ratio):
            for u_draw, w_draw in _cells(_residual(p0, q0), p0, p1):
                rows.append((x, u_accept, u_draw))
                weights.append(q0[x] * w_accept * w_draw)
    n = len(rows)
    p = torch.tensor(np.stack([p0, p1]))[None].expand(n, 2, V)
    q = torch.tensor(q0)[None, None].expand(n, 1, V)
    drafts = torch.tensor([[r[0]] for r in rows])
    count, tokens = verify(
        p, q, drafts, torch.tensor([[r[1]] for r in rows]), torch.tensor([r[2] for r in rows])
    )
    first, bonus, accepted = np.zeros(V), np.zeros(V), 0.0
    for (c, t), w in zip(zip(count.tolist(), tokens.tolist(), strict=True), weights, strict=True):
        first[t[0]] += w
        if c == 2:
            bonus[t[1]] += w
            accepted += w
    return first, bonus / max(accepted, 1e-300), accepted


CASES = {
    "dense": lambda rng: (_dist(rng, V), _dist(rng, V)),
    "p with zeros (top-p)": lambda rng: (_dist(rng, V, zeros=5), _dist(rng, V)),
    "q with zeros": lambda rng: (_dist(rng, V), _dist(rng, V, zeros=5)),
    "both with zeros": lambda rng: (_dist(rng, V, zeros=3), _dist(rng, V, zeros=4)),
    "q a point mass": lambda rng: (_dist(rng, V, zeros=2), np.eye(V)[rng.integers(V)]),
    "q a point mass where p is 0": lambda rng: (np.r_[0.0, _dist(rng, V - 1)], np.eye(V)[0]),
    "p a point mass": lambda rng: (np.eye(V)[3], _dist(rng, V)),
    "q equals p": lambda rng: (lambda p: (p, p.copy()))(_dist(rng, V, zeros=2)),
    "disjoint supports": lambda rng: (np.r_[_dist(rng, 4), np.zeros(4)], np.r_[np.zeros(4), _dist(rng, 4)]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", range(4))
def test_one_acceptance_step_gives_exactly_p(case, seed):
    rng = np.random.default_rng(seed)
    p0, q0 = CASES[case](rng)
    p1 = _dist(rng, V, zeros=2)
    first, bonus, accepted = _one_step_distribution(p0, q0, p1)
    np.testing.assert_allclose(first, p0, rtol=0, atol=1e-6)
    assert accepted == pytest.approx(np.minimum(p0, q0).sum(), abs=1e-9)  # the optimal rate
    if accepted > 0:
        np.testing.assert_allclose(bonus, p1, rtol=0, atol=1e-6)


def test_categorical_draws_each_index_with_its_weight_and_never_a_zero():
    rng = np.random.default_rng(7)
    for zeros in (0, 3, 6):
        w = _dist(rng, V, zeros) * 3.7  # unnormalised is fine
        cells = [*_cells(w), (0.0, 0.0), (1 - 2**-53, 0.0)]  # and the two ends of [0, 1)
        index = categorical(torch.tensor(w)[None].expand(len(cells), V), torch.tensor([c[0] for c in cells]))
        got = np.zeros(V)
        np.add.at(got, index.numpy(), [c[1] for c in cells])
        np.testing.assert_allclose(got, w / w.sum(), rtol=0, atol=1e-12)
        assert (w[index.numpy()] > 0).all()


# ------------------------------------------------------------------ whole decodes, exhaustively

VOCAB, LENGTH, WINDOW = 3, 4, 3


class TableModel:
    """A tiny autoregressive "model" as explicit conditional tables: p(x_t | x_<t), with zeros,
    and the distribution an initial draft of each position is drawn from (random, a point mass,
    or None: the window's last distribution, as the engine's ``last``)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.table = {
            prefix: _dist(rng, VOCAB, zeros=int(rng.integers(2)))
            for t in range(LENGTH + WINDOW)
            for prefix in itertools.product(range(VOCAB), repeat=t)
        }
        self.init = [None, np.eye(VOCAB)[rng.integers(VOCAB)], _dist(rng, VOCAB, zeros=1), None]
        self.init += [np.eye(VOCAB)[0]] * (WINDOW + 1)

    def joint(self) -> dict[tuple[int, ...], float]:
        out = {}
        for seq in itertools.product(range(VOCAB), repeat=LENGTH):
            out[seq] = float(np.prod([self.table[seq[:t]][seq[t]] for t in range(LENGTH)]))
        return out


def _jacobi_distribution(model: TableModel, verify_fn=verify) -> dict[tuple[int, ...], float]:
    """The exact distribution of the sequences Jacobi decoding writes with ``model``: the engine's
    composition (verify, cap at the length, jacobi_drafts with the initial drafts) over every
    cell of every uniform, states merged by their full content."""
    d = WINDOW - 1
    # state: (accepted prefix, drafts, q as bytes) -> probability; start: no token, no draft
    states = {((), (), np.zeros((0, VOCAB)).tobytes()): 1.0}
    done: dict[tuple[int, ...], float] = defaultdict(float)
    while states:
        rows = []
        for (prefix, drafts, q_bytes), weight in states.items():
            q = np.frombuffer(q_bytes).reshape(-1, VOCAB)
            t = len(drafts) + 1
            p = np.stack([model.table[prefix + drafts[:j]] for j in range(t)])  # (t, V)
            accept = [_accept_cells(p[j, x] / q[j, x]) for j, x in enumerate(drafts)]
            draws = _cells(*p, *(_residual(p[j], q[j]) for j in range(t - 1)))
            inits = [model.init[len(prefix) + c + j] for c in range(1, t + 1) for j in range(d)]
            redraw = _cells(*p, *(i for i in inits if i is not None))
            for a in itertools.product(*accept):
                for u_draw, w_draw in draws:
                    for r in itertools.product(redraw, repeat=d):
                        prob = weight * np.prod([c[1] for c in a]) * w_draw * np.prod([c[1] for c in r])
                        uniforms = [c[0] for c in a] + [u_draw] + [c[0] for c in r]
                        rows.append((prefix, drafts, q, p, uniforms, prob))
        # one batch per window width
        nxt: dict = defaultdict(float)
        for t in sorted({len(r[1]) + 1 for r in rows}):
            group = [r for r in rows if len(r[1]) + 1 == t]
            p = torch.tensor(np.stack([r[3] for r in group]))
            q = torch.tensor(np.stack([r[2] for r in group])).reshape(len(group), t - 1, VOCAB)
            drafts = torch.tensor([r[1] for r in group], dtype=torch.long).reshape(len(group), t - 1)
            u = torch.tensor([r[4] for r in group])
            count, tokens = verify_fn(p, q, drafts, u[:, : t - 1], u[:, t - 1])
            n = torch.tensor([len(r[0]) for r in group])
            count = torch.minimum(count, LENGTH - n)
            init = np.stack(
                [
                    [
                        model.init[len(r[0]) + c + j]
                        if model.init[len(r[0]) + c + j] is not None
                        else r[3][-1]
                        for j in range(d)
                    ]
                    for r, c in zip(group, count.tolist(), strict=True)
                ]
            )
            new_drafts, new_q = jacobi_drafts(p, count, torch.tensor(init), u[:, t : t + d])
            for r, c, tok, dr, nq in zip(
                group, count.tolist(), tokens.tolist(), new_drafts.tolist(), new_q.numpy(), strict=True
            ):
                prefix = r[0] + tuple(tok[:c])
                if len(prefix) == LENGTH:
                    done[prefix] += r[5]
                else:
                    nxt[(prefix, tuple(dr), nq.tobytes())] += r[5]
        states = nxt
    return done


@pytest.mark.parametrize("seed", range(3))
def test_jacobi_decoding_writes_exactly_the_models_joint_distribution(seed):
    model = TableModel(seed)
    expected, got = model.joint(), _jacobi_distribution(model)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
    for seq, prob in expected.items():
        assert got.get(seq, 0.0) == pytest.approx(prob, abs=1e-6), seq


def test_the_exhaustive_check_catches_a_wrong_acceptance_rule():
    """Accepting every draft (no test at all) is not exact; the same computation shows it."""

    def accept_all(p, q, drafts, accept_u, draw_u):
        return verify(p, q, drafts, torch.zeros_like(accept_u), draw_u)

    def skip_the_residual(p, q, drafts, accept_u, draw_u):  # a rejection draws from p itself
        count, tokens = verify(p, q, drafts, accept_u, draw_u)
        at = (count - 1).view(-1, 1, 1).expand(-1, 1, p.shape[-1])
        token = categorical(p.gather(1, at).squeeze(1), draw_u)
        return count, tokens.scatter(1, (count - 1).unsqueeze(1), token.unsqueeze(1))

    model = TableModel(0)
    expected = model.joint()
    for wrong in (accept_all, skip_the_residual):
        got = _jacobi_distribution(model, wrong)
        assert max(abs(got.get(s, 0.0) - p) for s, p in expected.items()) > 1e-2, wrong.__name__


def test_greedy_verification_and_drafts_against_a_plain_loop():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        w = int(torch.randint(1, 6, (1,), generator=gen))
        target = torch.randint(0, 3, (1, w), generator=gen)
        drafts = torch.where(
            torch.rand(1, w - 1, generator=gen) < 0.7,
            target[:, :-1],
            torch.randint(0, 3, (1, w - 1), generator=gen),
        )
        count, tokens = greedy_verify(target, drafts)
        expected = 1
        while expected < w and int(drafts[0, expected - 1]) == int(target[0, expected - 1]):
            expected += 1
        assert int(count) == expected and torch.equal(tokens[:, :expected], target[:, :expected])
        init = torch.randint(5, 9, (1, 4), generator=gen)
        nxt = greedy_drafts(target, count, init)
        want = [int(target[0, expected + j]) if expected + j < w else int(init[0, j]) for j in range(4)]
        assert nxt[0].tolist() == want
