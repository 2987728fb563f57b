"""Continuous batching (``engine.scheduler``): requests join and leave the running AR decode
between iterations, and each image's tokens equal its solo run with its seed, bit for bit
(CPU, float32). The oracle is ``ArEngine.generate`` of the request alone; the scheduler shares
its row functions but not its order of work, so a row that read another row's cache, slot,
generator or step count would write other tokens (sampling turns one different bit into another
token). The server part is in ``test_continuous_server.py``."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from glm_image.engine import ArEngine
from glm_image.engine.scheduler import ArScheduler
from glm_image.errors import Cancelled, GlmImageError

SHORT = ("a red circle", 64, 64)  # tiny: 256 preview + 4 target tokens
LONG = ("a tall blue 'SIGN' in the rain", 128, 96)  # 234 + 12
# Most rows stop early (``max_new_tokens``: the same code path, fewer forwards on a shared CPU);
# the first test decodes whole grids.
FEW = {"max_new_tokens": 24}
SOME = {"max_new_tokens": 60}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return ArEngine.from_pretrained(tiny_checkpoint)


def _image(height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


def _same(result, solo):
    assert torch.equal(result.tokens, solo.tokens)
    if solo.prior_tokens is None:
        assert result.prior_tokens is None
    else:
        assert torch.equal(result.prior_tokens, solo.prior_tokens)
    assert result.seeds == solo.seeds
    assert result.stats == solo.stats


def test_a_request_joining_mid_decode_gets_its_solo_tokens(engine):
    scheduler = ArScheduler(engine, max_rows=4)
    long = scheduler.submit(LONG[0], LONG[1], LONG[2], seeds=11)
    for _ in range(7):  # the long request is 6 tokens into its decode
        scheduler.step()
    assert scheduler.stats().running_rows == 1
    short = scheduler.submit(*SHORT, seeds=[5], **FEW)
    twins = scheduler.submit(*SHORT, seeds=3, num_images_per_prompt=2, **FEW)
    scheduler.run_until_idle()
    _same(long.wait(), engine.generate(*LONG, seeds=11))
    assert long.wait().prior_tokens is not None  # a whole grid
    _same(short.wait(), engine.generate(*SHORT, seeds=[5], **FEW))
    _same(twins.wait(), engine.generate(*SHORT, seeds=3, num_images_per_prompt=2, **FEW))
    # not a trivial pass: another seed writes other tokens
    other = engine.generate(*SHORT, seeds=[6], **FEW)
    assert not torch.equal(other.tokens, short.wait().tokens)


def test_a_short_request_sent_during_a_long_one_finishes_first(engine):
    scheduler = ArScheduler(engine, max_rows=2)
    long = scheduler.submit(*LONG, seeds=1, **SOME)
    scheduler.step()
    scheduler.step()
    short = scheduler.submit(*SHORT, seeds=2, **FEW)
    finished = []
    while not scheduler.idle:
        scheduler.step()
        finished += [
            name for name, t in (("long", long), ("short", short)) if t.done and name not in finished
        ]
    assert finished == ["short", "long"]
    assert short.finished < long.finished
    # static batching would have held the short request until the long one's last token
    stats = scheduler.stats()
    assert stats.running_rows == 0 and stats.queued_requests == 0
    assert stats.row_iterations > stats.iterations  # iterations ran both rows


def test_an_abandoned_request_frees_its_slot_at_the_next_iteration(engine):
    scheduler = ArScheduler(engine, max_rows=1)
    gone = {"flag": False}
    first = scheduler.submit(*LONG, seeds=1, abandoned=lambda: gone["flag"], **SOME)
    waiting = scheduler.submit(*SHORT, seeds=4, **FEW)
    for _ in range(3):
        scheduler.step()
    assert scheduler.stats().running_rows == 1 and not waiting.done
    gone["flag"] = True
    scheduler.step()  # drops the abandoned row, admits the waiting request in its slot
    assert first.done
    with pytest.raises(Cancelled):
        first.wait()
    assert scheduler.stats().running_rows == 1 and scheduler.stats().queued_requests == 0
    scheduler.run_until_idle()
    _same(waiting.wait(), engine.generate(*SHORT, seeds=4, **FEW))


def test_mixed_sizes_and_image_to_image_decode_together(engine):
    images = [_image(96, 128, 0)]
    scheduler = ArScheduler(engine, max_rows=3)
    edit = scheduler.submit("make the sign say 'BLUE'", 128, 96, seeds=[7], images=[images])
    scheduler.step()
    t2i = scheduler.submit(*SHORT, seeds=8, **FEW)
    wide = scheduler.submit("a wide field", 64, 128, seeds=9, **FEW)
    counts = []
    while not scheduler.idle:
        scheduler.step()
        counts.append(scheduler.stats().running_rows)
    assert max(counts) == 3  # the three rows ran in the same iterations
    solo = engine.generate("make the sign say 'BLUE'", 128, 96, seeds=[7], images=[images])
    _same(edit.wait(), solo)
    for (code, _), (solo_code, _) in zip(edit.wait().conditions[0], solo.conditions[0], strict=True):
        assert torch.equal(code, solo_code)
    assert edit.wait().prior_tokens is not None  # image-to-image: the target grid only, whole
    _same(t2i.wait(), engine.generate(*SHORT, seeds=8, **FEW))
    _same(wide.wait(), engine.generate("a wide field", 64, 128, seeds=9, **FEW))


def test_jacobi_rows_with_different_accepted_counts_decode_beside_sequential_rows(engine):
    scheduler = ArScheduler(engine, max_rows=4)
    calls = {
        "a": (LONG, {"seeds": 21, "decoding": "jacobi", "jacobi_window": 4, **SOME}),
        "seq": (SHORT, {"seeds": 22, **FEW}),
        "b": (
            SHORT,
            {"seeds": 23, "decoding": "jacobi", "jacobi_window": 3, "jacobi_drafts": "above", **SOME},
        ),
        "greedy": (SHORT, {"seeds": 24, "decoding": "jacobi", "jacobi_window": 5, "greedy": True, **SOME}),
    }
    tickets = {}
    for name, (args, kwargs) in calls.items():
        tickets[name] = scheduler.submit(*args, **kwargs)
        scheduler.step()  # each joins a running decode
    scheduler.run_until_idle()
    for name, (args, kwargs) in calls.items():
        _same(tickets[name].wait(), engine.generate(*args, **kwargs))
    a, b, greedy = tickets["a"], tickets["b"], tickets["greedy"]
    histograms = {a.wait().stats.accepted, b.wait().stats.accepted, greedy.wait().stats.accepted}
    assert len(histograms) == 3  # the rows accepted different counts per iteration
    assert a.wait().stats.forwards < a.wait().stats.tokens  # Jacobi: fewer forwards than tokens


def test_limits_and_bad_requests_fail_before_any_work(engine):
    with pytest.raises(GlmImageError, match="max_rows = 0; allowed: an integer >= 1"):
        ArScheduler(engine, max_rows=0)
    scheduler = ArScheduler(engine, max_rows=1, max_queued=1)
    scheduler.submit(*SHORT, seeds=1, **FEW)
    with pytest.raises(GlmImageError, match=r"queue is full \(1 requests waiting\)"):
        scheduler.submit(*SHORT, seeds=2)
    with pytest.raises(GlmImageError, match="height = 65 is not allowed"):
        scheduler.submit("x", 65, 64)
    with pytest.raises(GlmImageError, match="decoding"):
        scheduler.submit("x", 64, 64, decoding="beam")
    scheduler.run_until_idle()


@pytest.mark.parametrize("mode", ["apart", "invariant"])
def test_a_failing_request_fails_alone(engine, mode):
    """A fault in one row's step (apart: its forward; pooled: its own sampling) fails its
    request alone; the other rows, pooled with it, go on to their solo tokens."""
    if mode == "invariant" and ArScheduler(engine).mode != "invariant":
        pytest.skip("this machine's BLAS does not give pooled rows their solo bits (rows run apart)")
    scheduler = ArScheduler(engine, max_rows=3, mode=mode)
    good = scheduler.submit(*SHORT, seeds=31, **FEW)
    bad = scheduler.submit(*LONG, seeds=32, **SOME)
    other = scheduler.submit(*LONG, seeds=33, **FEW)
    for _ in range(4):
        scheduler.step()
    row = next(r for r in scheduler._running if r.ticket is bad)

    def fault(*args):
        raise RuntimeError("a kernel fault")

    def broken():
        fault()
        yield

    if mode == "apart":
        row.steps = broken()
    else:
        assert row.pooled and len(scheduler._pool.rows) == 3
        row.loop.picker = fault
    scheduler.run_until_idle()
    with pytest.raises(RuntimeError, match="a kernel fault"):
        bad.wait()
    _same(good.wait(), engine.generate(*SHORT, seeds=31, **FEW))
    _same(other.wait(), engine.generate(*LONG, seeds=33, **FEW))


def test_batched_rows_at_different_positions_decode_in_one_forward(engine):
    """``mode="batched"`` (the accelerator's default): the pooled rows share one forward per
    iteration, each at its own position, slot and visibility. Greedy rows must write their solo
    tokens (a row that read another row's keys, or kept a stale slot after the rows were packed
    again, would not); a sampled row's first token comes from its solo prefill, exactly."""
    scheduler = ArScheduler(engine, max_rows=3, mode="batched")
    calls = [
        (LONG, {"seeds": 1, "greedy": True, "max_new_tokens": 50}),
        (SHORT, {"seeds": 2, "greedy": True, "max_new_tokens": 20}),  # leaves first: rows packed again
        (("a wide field", 64, 128), {"seeds": 3, "greedy": True, "max_new_tokens": 40}),
        (SHORT, {"seeds": 4, "max_new_tokens": 30}),  # waits for a slot, joins a packed pool
    ]
    tickets = []
    for args, kwargs in calls:
        tickets.append(scheduler.submit(*args, **kwargs))
        scheduler.step()
    rows = []
    while not scheduler.idle:
        scheduler.step()
        rows.append(len(scheduler._pool.rows))
    assert max(rows) == 3
    for (args, kwargs), ticket in zip(calls, tickets, strict=True):
        solo = engine.generate(*args, **kwargs)
        if kwargs.get("greedy"):
            _same(ticket.wait(), solo)
        else:
            assert ticket.wait().tokens[0, 0] == solo.tokens[0, 0]
            assert bool((ticket.wait().tokens < engine.num_codes).all())
    with pytest.raises(GlmImageError, match="mode = 'fused'; allowed: apart, invariant, batched"):
        ArScheduler(engine, mode="fused")


@pytest.mark.slow
def test_gpu_run_continuous_stage_dry_run_on_the_cpu(tmp_path, gpu_run):
    """``gpu_run.sh OUT continuous`` as a GPU runs it, on the CPU with the tiny model, few tokens
    and requests, so a typo fails here rather than on a lent GPU; both JSON files must say what
    the stage measures."""
    import json

    out = tmp_path / "out"
    done = gpu_run(
        out,
        "continuous",
        timeout=1500,
        GPU_RUN_MODEL="tiny",
        GPU_RUN_DTYPE="float32",
        GPU_RUN_SIZE="64x64",
        GPU_RUN_CONTINUOUS_TOKENS="4",
        GPU_RUN_CONTINUOUS_REQUESTS="2",
        GPU_RUN_CONTINUOUS_STEPS="1",
    )
    assert done.returncode == 0 and "rc=0" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rc=1" not in done.stdout and "rc=124" not in done.stdout, done.stdout[-3000:]
    ar = json.loads((out / "bench_continuous_ar.json").read_text())
    assert [(r["rows"], r["decode_step"]) for r in ar["results"]] == [
        (1, "auto"), (1, "eager"), (16, "auto"), (16, "eager")
    ]  # fmt: skip
    assert all(r["ran_as"] == "batched" for r in ar["results"])
    assert all(r["tok_s"] > 0 and r["tokens"] == 4 * r["rows"] for r in ar["results"])
    load = json.loads((out / "bench_continuous_load.json").read_text())
    modes = {r["batching"]: r for r in load["results"]}
    assert set(modes) == {"continuous", "static", "continuous-stages", "static-stages"}
    assert all(r["ok"] for r in modes.values())
    for continuous in ("continuous", "continuous-stages"):  # the AR in the server, then in a worker
        assert modes[continuous]["ar"]["slot_occupancy"] > 0 and "throughput_vs_static" in modes[continuous]


def test_each_request_hears_its_own_progress_per_iteration(engine):
    """``submit(progress=)``: after each iteration its images' mean tokens written, only when it
    advanced, ending at its total; a Jacobi row's numbers are its solo run's."""
    scheduler = ArScheduler(engine, max_rows=4)
    heard = {"long": [], "twins": [], "jacobi": []}

    def hear(name):
        return lambda stage, done, total: heard[name].append((stage, done, total))

    scheduler.submit(*LONG, seeds=1, progress=hear("long"), **SOME)
    for _ in range(3):
        scheduler.step()
    scheduler.submit(*SHORT, seeds=2, num_images_per_prompt=2, progress=hear("twins"), **FEW)
    jacobi_call = {"seeds": 3, "decoding": "jacobi", "jacobi_window": 4, **FEW}
    scheduler.submit(*SHORT, progress=hear("jacobi"), **jacobi_call)
    scheduler.run_until_idle()
    steps = SOME["max_new_tokens"]
    assert heard["long"] == [("ar", done, steps) for done in range(1, steps + 1)]  # a token an iteration
    twins = [done for _, done, _ in heard["twins"]]
    # the second image is prefilled one iteration after the first: the mean lags by half a token
    assert twins == sorted(set(twins)) and twins[-1] == FEW["max_new_tokens"] and len(twins) >= 20
    assert {(stage, total) for stage, _, total in heard["twins"]} == {("ar", FEW["max_new_tokens"])}
    solo = []
    engine.generate(*SHORT, progress=lambda *report: solo.append(report), **jacobi_call)
    assert heard["jacobi"] == [r for i, r in enumerate(solo) if r not in solo[:i]]
    assert len(heard["jacobi"]) < FEW["max_new_tokens"]  # it accepted more than a token somewhere


def test_a_progress_callback_that_raises_fails_its_request_alone(engine):
    scheduler = ArScheduler(engine, max_rows=2)

    def broken(stage, done, total):
        raise RuntimeError("the listener broke")

    bad = scheduler.submit(*SHORT, seeds=1, progress=broken, **FEW)
    good = scheduler.submit(*SHORT, seeds=2, **FEW)
    scheduler.run_until_idle()
    with pytest.raises(RuntimeError, match="the listener broke"):
        bad.wait()
    _same(good.wait(), engine.generate(*SHORT, seeds=2, **FEW))
