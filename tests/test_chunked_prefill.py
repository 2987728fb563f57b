"""A long prompt's prefill in chunks (``decode.start_sequential_chunked``), one per scheduler
iteration while the other rows decode (``ArScheduler(prefill_chunk=)``, ``batched`` mode).

A chunk's GEMMs have fewer rows than the whole prefill's, so its logits are the whole prefill's
up to the last bits, not bitwise: the oracle is the whole prefill with a float32 tolerance, and
greedy tokens (argmax, no sampling to turn a last bit into another token). A chunk that did not
see the earlier chunks' slots misses the tolerance by orders of magnitude (shown)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from glm_image.engine import ArEngine, decode
from glm_image.engine.scheduler import ArScheduler
from glm_image.errors import Cancelled, GlmImageError

LONG = ("make the sign say 'BLUE'", 128, 128)  # 38 prompt tokens with its condition image
SHORT = ("a red circle", 64, 64)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return ArEngine.from_pretrained(tiny_checkpoint)


def _edit_image() -> Image.Image:
    g = torch.Generator().manual_seed(3)
    return Image.fromarray((torch.rand(128, 128, 3, generator=g) * 255).to(torch.uint8).numpy())


def _first_logits(engine, chunk: int | None) -> torch.Tensor:
    batch, _, _ = engine._plan([LONG[0]], LONG[1], LONG[2], [[_edit_image()]])
    kept = []
    real = decode.decide

    def spy(tp, picker, logits, noise, unfinished):
        kept.append(logits.clone())
        return real(tp, picker, logits, noise, unfinished)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode, "decide", spy)
        gens = [torch.Generator().manual_seed(1)]
        if chunk is None:
            decode.start_sequential(engine, batch, 4, gens, True, True)
        else:
            starting = decode.start_sequential_chunked(engine, batch, 4, gens, True, True, chunk)
            chunks = 0
            with pytest.raises(StopIteration):
                while True:
                    next(starting)
                    chunks += 1
            assert chunks == -(-batch.input_ids.shape[1] // chunk) - 1  # it yields between chunks
    return kept[0]


@pytest.mark.parametrize("chunk", [5, 16, 37])
def test_a_chunked_prefill_gives_the_whole_prefills_logits(engine, chunk, monkeypatch):
    whole = _first_logits(engine, None)
    chunked = _first_logits(engine, chunk)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)

    # a chunk that cannot see the earlier chunks' keys is far off: the test can fail
    real = ArEngine._prefill_chunk

    def blind(self, batch, cache, visible, start, end):
        hidden = visible.clone()
        hidden[:, :start] = False
        return real(self, batch, cache, hidden, start, end)

    monkeypatch.setattr(ArEngine, "_prefill_chunk", blind)
    assert (_first_logits(engine, chunk) - whole).abs().max() > 1e-2


def test_running_rows_decode_while_a_long_prompt_prefills_in_chunks(engine):
    scheduler = ArScheduler(engine, max_rows=3, mode="batched", prefill_chunk=8)
    short = scheduler.submit(*SHORT, seeds=1, greedy=True, max_new_tokens=40)
    for _ in range(3):
        scheduler.step()
    row = scheduler._pool.rows[0]
    edit = scheduler.submit(*LONG, seeds=[2], greedy=True, images=[[_edit_image()]])
    progress = []
    while True:
        before = row.next_step
        scheduler.step()
        chunked = [r for r in scheduler._running if r.ticket is edit]
        progress.append(row.next_step - before)
        if not chunked or chunked[0].prefill is None:
            break
    assert len(progress) == 5  # 38 tokens in chunks of 8: one per iteration
    assert progress == [1] * 5  # the decoding row stepped in every one of them
    scheduler.run_until_idle()
    assert torch.equal(
        short.wait().tokens, engine.generate(*SHORT, seeds=1, greedy=True, max_new_tokens=40).tokens
    )
    solo = engine.generate(*LONG, seeds=[2], greedy=True, images=[[_edit_image()]])
    assert torch.equal(edit.wait().tokens, solo.tokens)
    assert edit.wait().prior_tokens is not None


def test_a_request_abandoned_mid_prefill_frees_its_slot(engine):
    scheduler = ArScheduler(engine, max_rows=1, mode="batched", prefill_chunk=8)
    gone = []
    edit = scheduler.submit(*LONG, seeds=[2], images=[[_edit_image()]], abandoned=lambda: bool(gone))
    waiting = scheduler.submit(*SHORT, seeds=4, max_new_tokens=6)
    scheduler.step()
    (row,) = scheduler._running
    assert row.prefill is not None
    gone.append(True)
    scheduler.run_until_idle()
    with pytest.raises(Cancelled):
        edit.wait()
    assert row.prefill.gi_frame is None  # the prefill was closed
    assert waiting.wait().tokens.shape == (1, 6)


def test_chunks_need_the_batched_mode(engine):
    with pytest.raises(GlmImageError, match="prefill_chunk = 64: needs mode 'batched'"):
        ArScheduler(engine, mode="invariant", prefill_chunk=64)
    with pytest.raises(GlmImageError, match=r"prefill_chunk = 0; allowed: an integer >= 1, or None"):
        ArScheduler(engine, mode="batched", prefill_chunk=0)
    assert ArScheduler(engine, mode="batched").prefill_chunk == 512
    assert ArScheduler(engine, mode="apart").prefill_chunk is None
