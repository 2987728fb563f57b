"""Rank processes the engine spawns and owns (issue 16): configuration errors before any weights
load, a killed rank, an abandoned call, ``glm-image generate --ar-tp 2 / --dit-sp 2`` writing the
image of one process, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from parallel_helpers import busy, fail_on
from PIL import Image

from glm_image import GlmImage
from glm_image.errors import GlmImageError, StageDied, StageError
from glm_image.parallel.config import ParallelConfig
from glm_image.stages import ProcessStage, StageSpec


def _gone(pids) -> bool:
    """Every pid has exited and been reaped (no zombie left either)."""
    return all(not Path(f"/proc/{pid}").exists() for pid in pids)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


# ---------------------------------------------------------------- configuration, nothing loads


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ar_tp": 3}, r"ar_tp = 3: .* allowed: 1, 2, 4"),
        ({"dit_sp": 4}, r"dit_sp = 4: the DiT's 2 attention heads .* allowed: 1, 2"),
        ({"ar_tp": 0}, r"ar_tp = 0; allowed: an integer >= 1"),
        ({"placement": "far"}, r"placement = 'far'; allowed: same, separate"),
        ({"dit_sp": 2, "offload": True}, r"offload = True: .* allowed: offload False or None"),
    ],
)
def test_a_configuration_that_cannot_run_fails_before_any_weights_load(
    tiny_checkpoint, monkeypatch, options, message
):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("glm_image.engine.ar_engine.load_model", no_loading)
    monkeypatch.setattr("glm_image.engine.dit_engine.load_model", no_loading)
    monkeypatch.setattr(ProcessStage, "_start", no_loading)
    with pytest.raises(GlmImageError, match=message):
        GlmImage.from_pretrained(tiny_checkpoint, device="cpu", **options)


def test_more_ranks_than_devices_and_sizes_that_do_not_split_are_errors():
    with pytest.raises(GlmImageError, match=r"need 4 devices, but this machine has 0 cuda"):
        ParallelConfig(ar_tp=2, dit_sp=2, placement="separate").devices(torch.device("cuda"))
    assert ParallelConfig(ar_tp=2, dit_sp=2).devices(torch.device("cpu")) == (["cpu"] * 2, ["cpu"] * 2)
    ParallelConfig(dit_sp=8).check_size(128, 128)  # 64 tokens
    with pytest.raises(GlmImageError, match=r"size 96x96: its 36 image tokens do not split over dit_sp = 8"):
        ParallelConfig(dit_sp=8).check_size(96, 96)


# ---------------------------------------------------------------- failures


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """A two-rank DiT group for the failure tests that leave it usable."""
    with ProcessStage(StageSpec("dit", str(tiny_checkpoint), sp=2), ["cpu", "cpu"]) as g:
        yield g


@pytest.mark.parallel
def test_an_error_on_one_rank_is_raised_and_the_group_serves_on(pair):
    with pytest.raises(StageError, match="rank 1 fails on purpose"):
        pair.run(functools.partial(fail_on, rank=1))
    assert pair.run(functools.partial(busy, seconds=0)) == 0 and pair.broken is None


@pytest.mark.parallel
def test_an_abandoned_call_stops_on_every_rank_at_the_same_step(pair, tiny_checkpoint):
    from parallel_helpers import denoise_call

    from glm_image.stages import DitCall, PriorTokens

    call = denoise_call(["a cat"], False, steps=40)
    prior = PriorTokens(("a cat",), 64, 64, (0,), 1, call["prior_token_ids"])
    seen = []

    class Enough(Exception):
        pass

    def progress(stage, done, total):
        seen.append(done)
        if done == 3:
            raise Enough

    with pytest.raises(Enough):
        pair.run(DitCall(prior, 40, 1.5), progress)
    assert seen[-1] < 40 and pair.broken is None
    made = pair.run(DitCall(prior, 2, 1.5))  # the ranks are in step again
    assert len(made.images) == 1


@pytest.mark.parallel
def test_a_killed_rank_fails_the_call_clearly_and_leaves_no_process(tiny_checkpoint):
    group = ProcessStage(StageSpec("dit", str(tiny_checkpoint), sp=2), ["cpu", "cpu"])
    pids = group.pids
    outcome = {}

    def call():
        try:
            group.run(functools.partial(busy, seconds=60))
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)
    os.kill(pids[1], signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive()
    error = outcome["error"]
    assert isinstance(error, StageDied)
    assert f"rank 1 of 2 (pid {pids[1]}" in str(error) and "SIGKILL" in str(error)
    assert _gone(pids)
    with pytest.raises(StageDied, match="rank 1 of 2"):
        group.run(functools.partial(busy, seconds=0))
    group.close()


# ---------------------------------------------------------------- the command line


@pytest.mark.parallel
@pytest.mark.parametrize("flags", [["--ar-tp", "2"], ["--dit-sp", "2"]], ids=["ar-tp 2", "dit-sp 2"])
def test_generate_writes_the_image_of_one_process(cli, glm, tiny_checkpoint, tmp_path, flags):
    prompt, out = "a sign that says 'OPEN'", tmp_path / "out.png"
    done = cli(
        "generate",
        prompt,
        "--model",
        str(tiny_checkpoint),
        "--size",
        "128x128",
        "--steps",
        "3",
        "--seed",
        "5",
        "--device",
        "cpu",
        "-o",
        str(out),
        *flags,
    )
    assert done.returncode == 0, done.stderr
    expected = glm.generate(prompt, 128, 128, num_inference_steps=3, seed=5).images[0]
    ours = Image.open(out)
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    assert "x2" in ours.text["parallel"]


@pytest.mark.parallel
def test_torchrun_ranks_write_the_image_of_one_process_once(glm, tiny_checkpoint, tmp_path):
    prompt, out = "a sign that says 'OPEN'", tmp_path / "out.png"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    generate = ["-m", "glm_image.cli", "generate", prompt, "--model", str(tiny_checkpoint), "--seed", "5"]
    options = [
        "--size",
        "128x128",
        "--steps",
        "3",
        "--device",
        "cpu",
        "-o",
        str(out),
        "--ar-tp",
        "2",
        "--dit-sp",
        "2",
    ]
    done = subprocess.run(
        [*torchrun, *generate, *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("out.png") == 1  # written and reported by the first rank alone
    expected = glm.generate(prompt, 128, 128, num_inference_steps=3, seed=5).images[0]
    ours = np.asarray(Image.open(out), dtype=int)
    assert np.abs(ours - np.asarray(expected, dtype=int)).max() <= 1


@pytest.mark.parallel
def test_ctrl_c_stops_generate_and_its_ranks(tiny_checkpoint, tmp_path):
    command = [sys.executable, "-m", "glm_image.cli", "generate", "a cat", "--model", str(tiny_checkpoint)]
    command += ["--size", "256x256", "--steps", "100000", "--device", "cpu", "--dit-sp", "2"]
    process = subprocess.Popen([*command, "-o", str(tmp_path / "x.png")], stderr=subprocess.PIPE, text=True)
    deadline, ranks = time.monotonic() + 120, []
    while time.monotonic() < deadline and len(ranks) < 2:
        time.sleep(0.5)
        ranks = [
            p for p in _children(process.pid) if b"stages.worker" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
    assert len(ranks) == 2, "the ranks did not start"
    time.sleep(8)  # loaded, and (likely) generating
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert _gone(ranks)


@pytest.mark.parallel
def test_serve_on_ranks_answers_concurrent_requests_and_stops_its_ranks(glm, tiny_checkpoint, tmp_path):
    """`serve --ar-tp 2 --dit-sp 2 --placement separate`: concurrent requests each get their own
    image, the image one process gives, the stages overlapping; a killed rank fails the request with its pid and leaves the server up but
    unavailable (503, /health says why); SIGTERM stops the server and every rank it spawned."""
    pytest.importorskip("fastapi", reason="needs the serve extra")
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from test_server import OPENAI, b64_image, metrics, post, same_pixels
    from test_server_stages import free_port, serve_command

    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "glm_image.cli",
        "serve",
        "--model",
        str(tiny_checkpoint),
        "--port",
        str(port),
    ]
    argv += ["--device", "cpu", "--output-dir", str(tmp_path), "--ar-tp", "2", "--dit-sp", "2"]
    argv += ["--placement", "separate", "--max-batch", "1"]  # one request per call: calls can overlap
    with serve_command(argv, port) as (process, url):
        ranks = [
            p for p in _children(process.pid) if b"stages.worker" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert len(ranks) == 4, "an AR group and a DiT group of two ranks each"
        bodies = [
            {
                "prompt": f"a sign that says '{i}'",
                "size": "64x64",
                "seed": i,
                "steps": 8,
                "response_format": "b64_json",
            }
            for i in range(3)
        ]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda body: post(url, OPENAI, body), bodies))
        images = []
        for body, r in zip(bodies, answers, strict=True):
            assert r.status_code == 200, r.text
            (item,) = r.json()["data"]
            images.append(b64_image(item))
            expected = glm.generate(body["prompt"], 64, 64, num_inference_steps=8, seed=body["seed"])
            assert same_pixels(images[-1], expected.images[0])
        assert len({image.tobytes() for image in images}) == 3
        # the stages on devices of their own: one request's AR ran while another's DiT ran
        assert requests.get(url + "/health", timeout=10).json()["executor"]["mode"] == "threads"
        assert metrics(url)["glm_image_stage_overlap_seconds_total"] > 0

        # a rank that dies: the request fails naming it, and the server stays up, unavailable
        os.kill(ranks[-1], signal.SIGKILL)
        failed = post(url, OPENAI, {"prompt": "after", "size": "64x64", "steps": 2})
        assert failed.status_code in (500, 503), failed.text  # 503 once the group saw it first
        assert f"pid {ranks[-1]}" in failed.json()["error"]["message"], failed.text
        health = requests.get(url + "/health", timeout=10)
        assert health.status_code == 503 and f"pid {ranks[-1]}" in health.json()["reason"]
        assert post(url, OPENAI, {"prompt": "again", "size": "64x64"}).status_code == 503
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _gone(ranks):
        time.sleep(0.2)
    assert _gone(ranks)


def test_a_server_over_a_stopped_stage_group_says_it_cannot_serve():
    """Both executors read a stage handle's ``broken`` (a rank died), so /health says 503 and why;
    an engine in this process has none."""
    from types import SimpleNamespace

    from glm_image.server.executors import HandleRunner, InProcessExecutor
    from glm_image.stages import LocalStage

    stopped = SimpleNamespace(broken="the dit stage's rank 1 of 2 (pid 7) stopped with signal SIGKILL")
    local = LocalStage("ar", SimpleNamespace(device="cpu"))
    assert InProcessExecutor(SimpleNamespace(handles=(local, stopped))).broken == stopped.broken
    assert InProcessExecutor(SimpleNamespace(handles=(local, local))).broken is None
    assert HandleRunner("dit", stopped).broken == stopped.broken
    assert HandleRunner("ar", local).broken is None
