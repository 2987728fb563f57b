"""Batch-invariant rows (``engine.rows``): the AR scheduler's pooled rows decode in ONE forward
and still write their solo bits (CPU, float32). The oracle is ``ArEngine.generate`` of each
request alone; the rows here are sampled (not greedy), so one different bit in a row's logits
would show as another token. The same calls through the pool that shares its GEMMs among the
rows (``mode="batched"``) write other tokens: the test can fail."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from glm_image.engine import ArEngine, decode, row_pool
from glm_image.engine import rows as rows_module
from glm_image.engine.rows import RowsLinear, RowsOps, check_rows, rows_twin
from glm_image.engine.scheduler import ArScheduler
from glm_image.errors import GlmImageError
from glm_image.ops import TorchOps
from glm_image.quant import QuantLinear, quantize


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return ArEngine.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def exact(engine):
    """Skip where this machine's BLAS does not give a row its one-row bits inside a ``bmm`` (the
    scheduler then runs rows apart, which ``test_the_check_finds_...`` covers)."""
    why = check_rows(rows_twin(engine.model))
    if why is not None:
        pytest.skip(f"this machine's BLAS: {why}")


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())


# joined one iteration apart; the second leaves first (the pool packs its rows again); the
# fourth waits for a free slot and joins a packed pool; sizes, languages and an edit mixed
CALLS = [
    (("a tall blue 'SIGN' in the rain", 128, 96), {"seeds": 1, "max_new_tokens": 70}),
    (("a red circle", 64, 64), {"seeds": 2, "max_new_tokens": 12}),
    (("一块写着“营业中”的招牌", 64, 128), {"seeds": 3, "max_new_tokens": 50}),
    (("make the sign say 'BLUE'", 64, 64), {"seeds": [4], "max_new_tokens": 40, "images": [[_image(5)]]}),
]


def _run(scheduler: ArScheduler) -> tuple[list, int]:
    tickets, most = [], 0
    for args, kwargs in CALLS:
        tickets.append(scheduler.submit(*args, **kwargs))
        scheduler.step()
    while not scheduler.idle:
        scheduler.step()
        most = max(most, len(scheduler._pool.rows))
    return [t.wait() for t in tickets], most


@pytest.fixture
def logits_of(monkeypatch):
    """Every row's logits, in order, keyed by the row's ``unfinished`` flags (one tensor per
    row): the prefill's (``decode.decide``) and each step's (the pool's ``decide``)."""
    seen: dict = {}
    real = decode.decide

    def spy(tp, picker, logits, noise, unfinished):
        seen.setdefault(unfinished, []).append(logits.clone())
        return real(tp, picker, logits, noise, unfinished)

    monkeypatch.setattr(decode, "decide", spy)
    monkeypatch.setattr(row_pool, "decide", spy)
    return seen


def _same_logits(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_pooled_sampled_rows_write_their_solo_bits(engine, exact, logits_of):
    solos = []
    for args, kwargs in CALLS:
        logits_of.clear()
        result = engine.generate(*args, **kwargs)
        solos.append((result, *logits_of.values()))
    logits_of.clear()
    scheduler = ArScheduler(engine, max_rows=3)
    assert scheduler.mode == "invariant"  # the CPU's default
    results, most = _run(scheduler)
    assert most == 3  # three rows shared a forward
    rows = list(logits_of.values())
    for (solo, solo_logits), result in zip(solos, results, strict=True):
        assert torch.equal(result.tokens, solo.tokens)
        assert result.seeds == solo.seeds
        assert any(_same_logits(solo_logits, row) for row in rows)  # every step's logits, bitwise

    # the pool whose rows share each GEMM: the same calls, other logits (its tokens may agree)
    logits_of.clear()
    _run(ArScheduler(engine, max_rows=3, mode="batched"))
    rows = list(logits_of.values())
    assert not any(_same_logits(solo_logits, row) for _, solo_logits in solos for row in rows)


def test_rows_linear_is_each_rows_own_product(exact):
    torch.manual_seed(0)
    for bias in (True, False):
        linear = nn.Linear(96, 160, bias=bias)
        x = torch.randn(5, 1, 96)
        together = RowsLinear(linear)(x)
        alone = torch.cat([linear(x[i : i + 1]) for i in range(5)])
        assert torch.equal(together, alone)
        assert torch.equal(RowsLinear(linear)(x[:, 0]), alone[:, 0])  # (n, K) as the head's input
        assert not torch.equal(linear(x), alone)  # one GEMM of 5 rows rounds otherwise
    quant = QuantLinear(quantize(torch.randn(64, 96), "int8"), None, TorchOps())
    x = torch.randn(4, 1, 96)
    assert torch.equal(RowsLinear(quant)(x), torch.cat([quant(x[i : i + 1]) for i in range(4)]))


def test_rows_attention_bounds_each_row_by_its_own_position():
    torch.manual_seed(1)
    ops = TorchOps()
    q = torch.randn(3, 4, 1, 16)
    keys, values = torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    slots = torch.tensor([[5], [33], [17]])
    visible = torch.arange(40)[None, :] <= slots
    out = RowsOps(ops).window_attention(q, keys, values, visible, slots, scale=0.25)
    for i, end in enumerate((6, 34, 18)):
        alone = ops.decode_attention(
            q[i : i + 1], keys[i : i + 1], values[i : i + 1], visible[i : i + 1], scale=0.25, length=end
        )
        assert torch.equal(out[i : i + 1], alone)


def test_the_check_finds_a_shared_gemm_and_the_scheduler_falls_back(engine, exact, monkeypatch):
    twin = rows_twin(engine.model)
    assert check_rows(twin) is None
    assert twin.layers[0].mlp.down_proj.linear is engine.model.layers[0].mlp.down_proj  # no copy

    # a "rows" linear that is really one GEMM of all rows: the check names it
    shared = twin.layers[0].mlp.gate_up_proj  # the first of its shape (the check runs one per shape)
    shared.forward = lambda x: nn.functional.linear(x, shared.linear.weight)
    assert "layers.0.mlp.gate_up_proj" in check_rows(twin, rows=5)

    monkeypatch.setattr(rows_module, "check_rows", lambda twin: "a made-up rounding")
    assert ArScheduler(engine).mode == "apart"
    with pytest.raises(GlmImageError, match="mode = 'invariant' is not exact on cpu: a made-up rounding"):
        ArScheduler(engine, mode="invariant")
