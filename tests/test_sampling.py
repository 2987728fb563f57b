"""Token sampling functions against transformers' own logits warpers and torch.multinomial."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from glm_image.sampling import (
    SamplingParams,
    apply_filters,
    draw_with_noise,
    exponential_noise,
    top_k_filter,
    top_p_filter,
)


def _logits(seed: int, rows: int = 3, vocab: int = 16512, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("p", [0.05, 0.5, 0.75, 0.999, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_p_equals_the_reference_warper(p, seed):
    logits = _logits(seed)
    expected = TopPLogitsWarper(top_p=p)(None, logits.clone()) if p < 1 else logits
    assert torch.equal(top_p_filter(logits, p), expected)


@pytest.mark.parametrize("k", [1, 50, 16511, 16512, 100000])
def test_top_k_equals_the_reference_warper(k):
    logits = _logits(2)
    assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(top_k=k)(None, logits.clone()))


def test_peaked_rows_keep_at_least_one_token():
    logits = torch.full((2, 100), -50.0)
    logits[:, 7] = 50.0
    kept = torch.isfinite(top_p_filter(logits, 0.01))
    assert kept.sum().item() == 2 and kept[:, 7].all()


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"), [(0.9, 0.75, 16512), (1.3, 0.9, 40), (0.5, 1.0, None)]
)
def test_filters_compose_in_reference_order(temperature, top_p, top_k):
    logits = _logits(3)
    expected = logits.clone()
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    for warper in warpers:
        expected = warper(None, expected)
    assert torch.equal(apply_filters(logits, SamplingParams(temperature, top_p, top_k)), expected)


def draw(filtered: torch.Tensor, generators) -> torch.Tensor:
    """One token per row the way the decode loop draws it: its own generator's Exp(1) noise."""
    return draw_with_noise(filtered, exponential_noise(generators, 1, filtered.shape[-1], "cpu")[:, 0])


@pytest.mark.parametrize("seed", [0, 7, 123456789])
def test_draw_equals_multinomial_after_manual_seed(seed):
    filtered = apply_filters(_logits(seed, rows=1), SamplingParams(0.9, 0.75))
    torch.manual_seed(seed)
    expected = torch.multinomial(filtered.softmax(-1), num_samples=1).squeeze(1)
    assert torch.equal(draw(filtered, [torch.Generator().manual_seed(seed)]), expected)


def test_each_row_has_its_own_stream():
    filtered = apply_filters(_logits(4, rows=3), SamplingParams(0.9, 0.75))
    together = draw(filtered, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    alone = [draw(filtered[i : i + 1], [torch.Generator().manual_seed(s)]) for i, s in enumerate((5, 6, 7))]
    assert torch.equal(together, torch.cat(alone))
    assert torch.isfinite(filtered.gather(1, together[:, None])).all(), "never draws a removed token"


def test_parameter_validation():
    for bad in ({"temperature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


@pytest.mark.parametrize(
    "params", [SamplingParams(1.0, 0.75), SamplingParams(1.0, 0.75, 16512), SamplingParams(0.9, 0.5)]
)
def test_filters_never_modify_their_input(params):
    logits = _logits(8)
    before = logits.clone()
    apply_filters(logits, params)
    assert torch.equal(logits, before)


def test_ties_across_the_nucleus_edge_take_the_reference_path():
    """Quantised logits tie everywhere; the result must still be the reference warper's."""
    logits = torch.randint(-3, 4, (4, 16512), generator=torch.Generator().manual_seed(9)).float()
    for p in (0.3, 0.75, 0.9):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(top_p=p)(None, logits.clone()))
        expected = TopPLogitsWarper(top_p=p)(None, logits / 0.9)
        assert torch.equal(apply_filters(logits, SamplingParams(0.9, p)), expected)
