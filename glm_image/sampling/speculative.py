"""Speculative verification of a window of draft tokens, and the Jacobi update, as pure functions.

One window forward reads ``W`` tokens: the last accepted token and ``W - 1`` drafts. It gives the
target distributions ``p`` of ``W`` positions: those of the ``W - 1`` drafts, and the one after
them. Verification walks the drafts in order (Leviathan et al. 2023; Chen et al. 2023):

- draft ``x`` drawn from ``q`` is accepted with probability ``min(1, p(x) / q(x))``;
- at the first rejection the token is drawn from ``max(0, p - q)`` normalised, and accepted;
- if every draft is accepted, the position after them is drawn from its ``p`` (the bonus).

So ``1 <= count <= W`` tokens are accepted, and each has exactly the distribution sequential
sampling gives it: for one position, ``P(x) = q(x) min(1, p(x)/q(x)) + P(reject) r(x) = min(p, q)(x)
+ max(0, p - q)(x) = p(x)``. This holds whatever ``q`` is (zeros, a point mass, stale), provided
the draft really was drawn from ``q`` given everything that came before and the uniform is fresh.

The Jacobi update (Song et al. 2021; Teng et al. 2024, SJD) then proposes the next window's
drafts: a position this forward computed takes a fresh draw from its (possibly stale) ``p``,
with ``q = p``; a position past it takes the caller's initial distribution. Every draft is
verified at most once and every draw uses its own uniform, so the argument above applies to each.

Draws use the inverse CDF with one uniform in [0, 1) per token, both in float64 (a float32
uniform's 2^-24 steps would misweight tokens rarer than that), so a window needs ``2W - 1``
uniforms per row, not ``W`` vocabulary-wide noise vectors.

**Why any of this is exact, in one condition.** Let ``H_k`` be everything decided at generated
indices below ``k``: their drafts, uniforms and verifications, in every iteration. Verification
at ``k`` reads the draft ``x``, its ``q`` and the target ``p`` (the model given the accepted
tokens before ``k``: ``H_k``-measurable), and two fresh uniforms. It gives ``k`` exactly ``p``
whenever **given H_k, x is distributed as q** (and ``q`` is ``H_k``-measurable): the identity
above only integrates over ``x`` and the two uniforms. Nothing before ``k`` ever looks at a
draft at ``k`` (a forward is causal; a verification stops at its first rejection, below ``k``
when ``k`` is still a draft), so each way of renewing drafts below only has to keep that one
condition. Three do (``jacobi_drafts``):

- *independent* (SJD): a fresh uniform, ``q`` = the new ``p``;
- *noise* (coupled drafts, MC-SJD's noise coupling in inverse-CDF form): the position's own
  uniform ``u_k``, drawn once and reused for every draft of ``k``, so the draft moves only when
  its distribution moved across ``u_k``. ``u_k`` is used for drafts at ``k`` alone and never by a
  verification, so it is independent of ``H_k``: each draft ``F_q^{-1}(u_k)`` is ``q``-distributed
  given ``H_k``, although consecutive drafts of ``k`` are dependent (which is the point);
- *continuation* (SJD-PAC's adaptive continuation past the first rejection; MC-SJD's maximal
  coupling): the old draft ``x ~ q_old`` is kept with probability ``min(1, p(x) / q_old(x))``,
  else redrawn from ``max(0, p - q_old)`` normalised, both with fresh uniforms: the one-step
  identity again, now with ``q_old`` as the draft and ``p`` as the target, makes the new draft
  ``p``-distributed given ``H_k``, and ``q = p`` for its verification. It keeps a draft with the
  largest probability any rule can, ``1 - TV(q_old, p)``.

What would break it (the tests' deliberately wrong variants): a verification or a continuation's
residual draw that reuses ``u_k``. ``u_k`` made the draft, so given the draft it is no longer
uniform, and a rejection then draws from the wrong part of the residual.
"""

from __future__ import annotations

import torch

__all__ = [
    "categorical",
    "continue_drafts",
    "greedy_drafts",
    "greedy_verify",
    "jacobi_drafts",
    "leading_true",
    "verify",
]


def categorical(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of non-negative ``weights`` (..., V) with a positive sum, by inverse CDF:
    the first index whose cumulative weight exceeds ``u * total``, ``u`` (...) in [0, 1).
    A zero weight is never drawn: its cumulative value equals its predecessor's."""
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)  # (..., V)
    total = cdf[..., -1:]
    # below the total even where u * total rounds up to it, so a trailing zero is never drawn
    target = torch.minimum(u.double().unsqueeze(-1) * total, torch.nextafter(total, total.new_zeros(())))
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_max(weights.shape[-1] - 1)


def leading_true(flags: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (B,) how many leading entries are True."""
    return ((~flags).long().cumsum(dim=-1) == 0).sum(dim=-1)


def verify(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, accept_u: torch.Tensor, draw_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative verification of one window.

    p (B, W, V): target probabilities of the window's positions; drafts (B, W - 1) proposed for
    the first W - 1 of them, drawn from q (B, W - 1, V); accept_u (B, W - 1) and draw_u (B,)
    uniforms in [0, 1). Returns count (B,) in [1, W] and tokens (B, W): the first ``count``
    entries are the accepted tokens (the drafts, then the corrected or bonus token); the rest are
    the unverified drafts, meaningless.
    """
    b, w, v = p.shape
    p_x = p[:, : w - 1].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, W-1)
    q_x = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    # q(x) = 0 means q cannot have proposed x; any rule is exact there, this one keeps x if p may
    ratio = torch.where(q_x > 0, p_x / q_x.clamp_min(torch.finfo(q.dtype).tiny), (p_x > 0).to(p.dtype))
    accepted = leading_true(accept_u < ratio)  # (B,) in [0, W-1]
    at = accepted.view(b, 1, 1).expand(b, 1, v)
    p_at = p.gather(1, at).squeeze(1)  # (B, V)
    if w > 1:  # the bonus position (accepted = W - 1) has no draft: q = 0 there
        q_at = q.gather(1, at.clamp_max(w - 2)).squeeze(1) * (accepted < w - 1).unsqueeze(1)
        residual = (p_at - q_at).clamp_min(0)
    else:
        residual = p_at
    # p <= q everywhere (p == q up to rounding): a rejection had probability ~0; draw from p then
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    token = categorical(torch.where(empty, p_at, residual), draw_u)  # (B,)
    tokens = torch.cat([drafts, token.unsqueeze(1)], dim=1).scatter(
        1, accepted.unsqueeze(1), token.unsqueeze(1)
    )
    return accepted + 1, tokens


def greedy_verify(target: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``verify`` for argmax decoding: target (B, W) the argmax tokens of the window's positions,
    drafts (B, W - 1). A draft is accepted iff it equals the argmax; the first mismatch (or the
    bonus position) takes the argmax. Returns count (B,) in [1, W] and the tokens (B, W)."""
    count = leading_true(drafts == target[:, :-1]) + 1
    return count, target


def _sources(p_width: int, count: torch.Tensor, drafts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the next window's ``drafts`` positions: the index into this window's positions that
    computed each (count + j), clamped, and whether it was computed at all (B, D) each."""
    source = count.unsqueeze(1) + torch.arange(drafts, device=count.device)  # (B, D)
    return source.clamp_max(p_width - 1), source < p_width


def continue_drafts(
    p: torch.Tensor, q_old: torch.Tensor, old: torch.Tensor, keep_u: torch.Tensor, draw_u: torch.Tensor
) -> torch.Tensor:
    """Continuation (the maximal coupling): drafts ``old`` (...) drawn from ``q_old`` (..., V),
    renewed for the new distributions ``p`` (..., V). Each is kept if ``keep_u < p(x) / q_old(x)``,
    else drawn (``draw_u``) from ``max(0, p - q_old)``: ``p``-distributed whenever ``old`` was
    ``q_old``-distributed and both uniforms are fresh (the module docstring)."""
    p_x = p.gather(-1, old.unsqueeze(-1)).squeeze(-1)
    q_x = q_old.gather(-1, old.unsqueeze(-1)).squeeze(-1)
    # q_old(x) = 0: x was not drawn from q_old (cannot happen); keep it where p may, as verify does
    ratio = torch.where(q_x > 0, p_x / q_x.clamp_min(torch.finfo(p.dtype).tiny), (p_x > 0).to(p.dtype))
    residual = (p - q_old).clamp_min(0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # p <= q_old: a change had probability ~0
    fresh = categorical(torch.where(empty, p, residual), draw_u)
    return torch.where(keep_u < ratio, old, fresh)


def jacobi_drafts(
    p: torch.Tensor,
    count: torch.Tensor,
    init: torch.Tensor,
    u: torch.Tensor,
    *,
    old: torch.Tensor | None = None,
    q_old: torch.Tensor | None = None,
    keep_u: torch.Tensor | None = None,
    draw_u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next window's drafts and the distributions they are drawn from.

    p (B, W, V) this window's target probabilities; count (B,) the tokens accepted from it, so
    the next drafts sit at this window's positions count, count + 1, ...; init (B, D, V) the
    distribution for a position this window did not compute; u (B, D) the uniforms of their
    draws (fresh, or each position's own: the noise coupling). Returns drafts (B, D) and q
    (B, D, V): a computed position is redrawn from its p (the Jacobi update), any other from init.

    Continuation (``old`` given): ``old`` (B, W - 1) this window's drafts, drawn from ``q_old``
    (B, W - 1, V). A computed position that holds one (past the first rejection: never
    verified) renews it by ``continue_drafts`` with the fresh uniforms ``keep_u``, ``draw_u``
    (B, D) instead of redrawing; ``q`` is its p either way.
    """
    _, w, v = p.shape
    source, computed = _sources(w, count, init.shape[1])
    q = torch.where(computed.unsqueeze(-1), p.gather(1, source.unsqueeze(-1).expand(-1, -1, v)), init)
    drafts = categorical(q, u)
    if old is None or old.shape[1] == 0:
        return drafts, q
    held = computed & (source < old.shape[1])  # (B, D): the position holds an unverified draft
    at = source.clamp_max(old.shape[1] - 1)
    previous = old.gather(1, at)
    before = q_old.gather(1, at.unsqueeze(-1).expand(-1, -1, v))
    kept = continue_drafts(q, before, previous, keep_u, draw_u)
    return torch.where(held, kept, drafts), q


def greedy_drafts(target: torch.Tensor, count: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """``jacobi_drafts`` for argmax decoding: target (B, W) this window's argmax tokens, init
    (B, D) tokens for positions it did not compute. Returns the drafts (B, D)."""
    source, computed = _sources(target.shape[1], count, init.shape[1])
    return torch.where(computed, target.gather(1, source), init)
