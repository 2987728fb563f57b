"""Device graphs kept per bucket (``engine.graphs``): a later call of a bucket refills the bucket's
buffers and replays the graph its first call captured, and writes the eager tokens.

No GPU here: ``fake_graphs`` gives the CPU a graph API whose graph records the ATen ops of its
capture and replays them on the captured tensors with the captured scalars, never the step's
Python, so a buffer rebound to a new tensor or a call's value baked into the step shows as
wrong tokens, as on a device. The CPU's NumPy top-p (invisible to it, never taken on a device)
is switched off for every run, eager ones included; the torch path is bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from fake_graphs import install

from glm_image.engine import decode, graphs
from glm_image.engine.graphs import GraphCache, bucket_capacity

PROMPTS = ["'A'", "a sign that says 'OPEN'", "一张写着「欢迎」的海报"]  # 16, 22 and 24 prompt tokens


@pytest.fixture
def engine(tiny_ar, monkeypatch):
    """``tiny_ar`` with the fake graph API, an empty graph cache, batches decoded together and
    buckets of 64 slots (short calls reach a second capacity)."""
    from glm_image.sampling import tokens

    install(monkeypatch)
    monkeypatch.setattr(graphs, "CAPACITY_STEP", 64)
    monkeypatch.setattr(tokens, "_top_p_threshold", lambda logits, p: None)
    monkeypatch.setattr(tiny_ar, "graphs", GraphCache())
    monkeypatch.setattr(tiny_ar, "batch_invariant", False)
    monkeypatch.setattr(tiny_ar, "decode_step", "auto")
    return tiny_ar


def _both(engine, prompts, size, **call):
    """(eager result, graph result) of one call."""
    engine.decode_step = "eager"
    eager = engine.generate(prompts, *size, **call)
    engine.decode_step = "auto"
    return eager, engine.generate(prompts, *size, **call)


def test_bucket_capacity_rounds_up():
    assert graphs.CAPACITY_STEP == 256
    assert [bucket_capacity(n) for n in (1, 256, 257)] == [256, 256, 512]


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_a_bucket_replays_its_first_capture(engine, greedy):
    """Sequential decoding: a bucket's later calls (another prompt length, seed and token count)
    capture nothing and write the eager tokens; another batch or capacity captures once more."""
    calls = [  # (prompts, size, seeds, tokens), the captures each makes
        ([PROMPTS[0]], (64, 64), [1], 40, 1),  # 16 + 40 slots: the 64-slot bucket of batch 1
        ([PROMPTS[1]], (64, 64), [7], 33, 0),  # the same bucket: 22 + 33 slots
        (PROMPTS[1:], (64, 64), [2, 3], 40, 1),  # batch 2 (left padding): a new bucket
        (PROMPTS[:2], (64, 64), [8, 9], 30, 0),  # batch 2 again, other padding
        ([PROMPTS[2]], (64, 64), [4], 50, 1),  # 24 + 50 slots: the 128-slot bucket
        ([PROMPTS[0]], (128, 192), [5], 30, 0),  # another size, back in the first bucket
    ]
    for prompts, size, seeds, tokens, captures in calls:
        eager, graph = _both(engine, prompts, size, seeds=seeds, greedy=greedy, max_new_tokens=tokens)
        assert (graph.decode_step, graph.graph_captures) == ("graph", captures), (prompts, tokens)
        assert graph.tokens.shape == (len(prompts), tokens)
        assert torch.equal(graph.tokens, eager.tokens), (prompts, tokens)
    assert engine.graph_captures == 3 and len(engine.graphs) == 3


def test_rows_decoded_apart_share_a_bucket(engine, monkeypatch):
    """Each row alone (``batch_invariant``) is a batch of one: the second row replays the first's graph."""
    monkeypatch.setattr(engine, "batch_invariant", True)
    eager, graph = _both(engine, PROMPTS, (64, 64), seeds=[3, 4, 5], max_new_tokens=24)
    assert graph.graph_captures == 1 and torch.equal(graph.tokens, eager.tokens)


def test_the_cache_is_bounded_and_dropped_on_a_move(engine, monkeypatch):
    monkeypatch.setattr(engine, "graphs", GraphCache(limit=1))
    call = {"seeds": 1, "greedy": True, "max_new_tokens": 12}
    captures = [engine.generate(p, 64, 64, **call).graph_captures for p in (PROMPTS[:1], PROMPTS[:2])]
    # the batch-2 bucket evicted the batch-1 bucket, so batch 1 is captured again
    assert [*captures, engine.generate(PROMPTS[:1], 64, 64, **call).graph_captures] == [1, 1, 1]
    engine.decode_step = "static"  # no graph: no bucket used
    assert engine.generate(PROMPTS[:1], 64, 64, **call).graph_captures == 0
    assert len(engine.graphs) == 1
    engine.decode_step = "auto"
    engine.to("cpu")
    assert len(engine.graphs) == 0
    monkeypatch.setattr(engine, "graphs", GraphCache(limit=0))  # a capture per call, as before
    assert [engine.generate(PROMPTS[:1], 64, 64, **call).graph_captures for _ in range(2)] == [1, 1]


def test_a_lora_selection_has_buckets_of_its_own(engine):
    """A graph replays the adapters its capture saw: another selection is another bucket."""
    from glm_image.lora import Adapter, LoraSet, ModuleLora

    text, g = engine.config.ar.text, torch.Generator().manual_seed(0)
    update = {
        f"model.language_model.layers.{i}.mlp.down_proj": ModuleLora(
            torch.randn(4, text.intermediate_size, generator=g), torch.randn(text.hidden_size, 4, generator=g)
        )
        for i in range(text.num_hidden_layers)
    }
    lora = LoraSet.of(engine.model)
    lora.add("graph-reuse", Adapter("ar", "random", update))
    call = {"seeds": [1], "greedy": True, "max_new_tokens": 24}
    try:
        base_eager, base = _both(engine, PROMPTS[:1], (64, 64), **call)
        with lora.selected((("graph-reuse", 1.0),)):
            adapted_eager, adapted = _both(engine, PROMPTS[:1], (64, 64), **call)
        again = engine.generate(PROMPTS[:1], 64, 64, **call)
    finally:
        lora.remove()
        del lora.adapters["graph-reuse"]
    assert [base.graph_captures, adapted.graph_captures, again.graph_captures] == [1, 1, 0]
    assert not torch.equal(adapted_eager.tokens, base_eager.tokens), "the adapter changes tokens"
    assert torch.equal(adapted.tokens, adapted_eager.tokens)
    assert torch.equal(base.tokens, base_eager.tokens) and torch.equal(again.tokens, base_eager.tokens)


def test_a_rebound_buffer_gives_other_tokens(engine, monkeypatch):
    """The fake graph is faithful: a call that gives the bucket's loop a new token buffer
    instead of refilling it (the graph keeps writing the old one) loses its tokens."""
    load = decode.DecodeLoop.load

    def rebinding(self, *args):
        load(self, *args)
        self.tokens = self.tokens.clone()

    call = {"seeds": [1], "greedy": True, "max_new_tokens": 20}
    first = engine.generate(PROMPTS[0], 64, 64, **call)
    monkeypatch.setattr(decode.DecodeLoop, "load", rebinding)
    second = engine.generate(PROMPTS[0], 64, 64, **call)
    assert second.graph_captures == 0 and not torch.equal(second.tokens, first.tokens)


@pytest.mark.parametrize(
    ("greedy", "drafts"),
    [(True, "above"), (False, "last"), (False, "above")],
    ids=["greedy", "sampled", "above"],
)
def test_jacobi_buckets_replay_their_first_capture(engine, greedy, drafts):
    """Jacobi windows (W 4): the same for the iteration's graph; the forwards match too."""
    jacobi = {"decoding": "jacobi", "jacobi_window": 4, "jacobi_drafts": drafts, "greedy": greedy}
    calls = [
        ([PROMPTS[0]], [1], 40, 1),
        ([PROMPTS[2]], [6], 30, 0),  # the same bucket (batch 1, 64 slots)
        (PROMPTS[:2], [2, 3], 30, 1),  # batch 2
        (PROMPTS[1:], [8, 9], 30, 0),  # batch 2 again, other padding
    ]
    for prompts, seeds, tokens, captures in calls:
        eager, graph = _both(engine, prompts, (64, 64), seeds=seeds, max_new_tokens=tokens, **jacobi)
        assert (graph.decode_step, graph.graph_captures) == ("graph", captures), (prompts, tokens)
        assert torch.equal(graph.tokens, eager.tokens), (prompts, tokens)
        assert graph.stats.image_forwards == eager.stats.image_forwards
        assert graph.stats.accepted == eager.stats.accepted
    # sequential decoding's buckets are not Jacobi's
    assert engine.generate(PROMPTS[0], 64, 64, seeds=[1], max_new_tokens=20).graph_captures == 1


def test_a_generation_reports_its_captures_and_the_server_counts_them(glm, monkeypatch):
    """``GenerationOutput.ar_graph_captures``: a second request at a seen shape captures nothing;
    the server's ``/metrics`` adds each call's captures up."""
    from glm_image.server.metrics import Metrics

    install(monkeypatch)
    ar = glm.handles[0].engine
    monkeypatch.setattr(ar, "graphs", GraphCache())
    monkeypatch.setattr(ar, "decode_step", "auto")
    metrics = Metrics()
    for seed, captures in ((1, 1), (2, 0)):
        out = glm.generate(PROMPTS[1], 64, 64, num_inference_steps=1, seed=seed)
        assert out.ar_graph_captures == captures
        metrics.count_engine_call(1, out.timings, graphs=out.ar_graph_captures)
    assert "\nglm_image_ar_graph_captures_total 1\n" in metrics.render(0, 8, 0)
