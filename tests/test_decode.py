"""The decode loop's pieces: chunked (and prefetched) sampling noise, eager vs CUDA-graph steps."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from glm_image.engine.decode import NoiseStream

VOCAB = 257


def _stepwise(seeds, steps):
    """The reference's noise: one exponential_ call per row per step."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return torch.stack(
        [
            torch.stack([torch.empty(VOCAB).exponential_(generator=g) for _ in range(steps)])
            for g in generators
        ]
    )


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize(("steps", "chunk"), [(10, 4), (7, 7), (5, 64)])
def test_chunked_noise_is_the_stepwise_noise(prefetch, steps, chunk):
    seeds = (3, 11)
    stream = NoiseStream(
        [torch.Generator().manual_seed(s) for s in seeds],
        steps,
        VOCAB,
        torch.device("cpu"),
        chunk=chunk,
        prefetch=prefetch,
    )
    got = []
    for step in range(steps):
        if step % stream.chunk == 0:
            stream.refill(step)
        got.append(stream.buffer[:, step % stream.chunk].clone())
    stream.close()
    assert torch.equal(torch.stack(got, dim=1), _stepwise(seeds, steps))


def test_an_early_stop_ends_the_worker():
    stream = NoiseStream(
        [torch.Generator().manual_seed(0)], 1000, VOCAB, torch.device("cpu"), chunk=8, prefetch=True
    )
    stream.refill(0)
    stream.close()
    assert not stream._worker.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "glm-image-noise" and t.is_alive()]


def test_a_failing_worker_raises_in_the_consumer(monkeypatch):
    calls = []

    def draw(self, count):
        calls.append(count)
        if len(calls) > 1:
            raise RuntimeError("the generator broke")
        return torch.ones(1, count, VOCAB)

    monkeypatch.setattr(NoiseStream, "_draw", draw)
    stream = NoiseStream([torch.Generator()], 100, VOCAB, torch.device("cpu"), chunk=4, prefetch=True)
    stream.refill(0)
    with pytest.raises(RuntimeError, match="the generator broke"):
        stream.refill(4)
    stream.close()
    assert not stream._worker.is_alive()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("greedy", [True, False])
def test_cuda_graph_decode_equals_eager(tiny_checkpoint, greedy):
    from glm_image.engine import ArEngine

    engine = ArEngine.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.float32)
    prompts = ["a sign that says 'OPEN'", "一张写着「欢迎」的海报"]
    results = {}
    for step in ("eager", "graph"):
        engine.decode_step = step
        results[step] = engine.generate(prompts, 256, 384, seeds=[4, 9], greedy=greedy)
    # "graph" raises if capture fails, and the result says a graph ran: no silent eager fallback
    assert results["graph"].decode_step == "graph" and results["eager"].decode_step == "eager"
    assert torch.equal(results["graph"].tokens, results["eager"].tokens)


@pytest.fixture(scope="module")
def ar_engine(tiny_checkpoint):
    from glm_image.engine import ArEngine

    return ArEngine.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(
    ("greedy", "constrain"), [(True, True), (False, True), (False, False)], ids=["greedy", "sample", "free"]
)
def test_the_graph_step_run_eagerly_equals_the_eager_loop(ar_engine, greedy, constrain, monkeypatch):
    """What a CUDA graph replays (device-side step counter, slot, rotary row, noise row, a
    tensor length bound) gives the eager loop's tokens, on any device."""
    prompts = ["a sign that says 'OPEN'", "一张写着「欢迎」的海报"]
    call = {"seeds": [4, 9], "greedy": greedy, "constrain_grid": constrain, "max_new_tokens": 70}
    eager = ar_engine.generate(prompts, 128, 192, **call)
    monkeypatch.setattr(ar_engine, "decode_step", "static")
    static = ar_engine.generate(prompts, 128, 192, **call)
    assert (eager.decode_step, static.decode_step) == ("eager", "static")
    assert torch.equal(static.tokens, eager.tokens)


def test_the_graph_step_through_the_triton_kernels(ar_engine, monkeypatch):
    """The graph step with Triton's decode attention reading its bound from a device tensor."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("covered on CUDA by test_cuda_graph_decode_equals_eager")
    from glm_image.ops.triton_ops import TritonOps

    call = {"seeds": [2], "greedy": True, "max_new_tokens": 12}
    eager = ar_engine.generate("'A'", 64, 64, **call).tokens
    monkeypatch.setattr(ar_engine.model, "ops", TritonOps(torch.device("cpu")))
    monkeypatch.setattr(ar_engine, "decode_step", "static")
    assert torch.equal(ar_engine.generate("'A'", 64, 64, **call).tokens, eager)
    assert ar_engine.model.ops.fallbacks == []


def test_a_required_graph_fails_loudly_where_none_exists(ar_engine, monkeypatch):
    """decode_step='graph' never degrades silently: on a CPU (no graph API) it is an error."""
    from glm_image.errors import GlmImageError

    monkeypatch.setattr(ar_engine, "decode_step", "graph")
    with pytest.raises(GlmImageError, match=r"decode_step = 'graph'.*cpu has no graph API"):
        ar_engine.generate("'A'", 64, 64, seeds=[1], max_new_tokens=8)
    monkeypatch.setattr(ar_engine, "decode_step", "auto")
    assert ar_engine.generate("'A'", 64, 64, seeds=[1], max_new_tokens=8).decode_step == "eager"


class _FailingCapture:
    """A device namespace whose graph capture fails, as an unsupported op would on a GPU."""

    class Stream:
        def __init__(self, device):
            pass

        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    class Graph:
        pass

    @staticmethod
    def current_stream(device):
        return _FailingCapture.Stream(device)

    @staticmethod
    @contextlib.contextmanager
    def stream(stream):
        yield

    @staticmethod
    @contextlib.contextmanager
    def graph(graph, stream=None):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield


@pytest.mark.parametrize("greedy", [True, False])
def test_a_failed_capture_is_logged_and_changes_no_token(ar_engine, monkeypatch, caplog, greedy):
    """The warm-up step before capture ran for real; after the failure the eager loop must still
    give the eager tokens (the step counter and the noise are as if nothing happened)."""
    from glm_image.engine import graphs
    from glm_image.errors import GlmImageError

    call = {"seeds": [3, 8], "greedy": greedy, "max_new_tokens": 40}
    prompts = ["a sign that says 'OPEN'", "一张写着「欢迎」的海报"]
    eager = ar_engine.generate(prompts, 64, 64, **call)
    monkeypatch.setattr(torch, "fakegraphs", _FailingCapture, raising=False)
    monkeypatch.setitem(graphs._GRAPH_APIS, "cpu", ("fakegraphs", "Graph"))
    with caplog.at_level("WARNING", logger="glm_image.engine.ar_engine"):
        fallen_back = ar_engine.generate(prompts, 64, 64, **call)
    assert fallen_back.decode_step == "eager"
    assert "decoding without a device graph: capture failed: operation not permitted" in caplog.text
    assert torch.equal(fallen_back.tokens, eager.tokens)
    monkeypatch.setattr(ar_engine, "decode_step", "graph")
    with pytest.raises(GlmImageError, match="cannot be captured \\(capture failed"):
        ar_engine.generate(prompts, 64, 64, **call)
