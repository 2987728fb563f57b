"""A rank that stops answering (SIGSTOP, a wedged process) is a dead rank (issue 30): the call
fails naming the rank, its pid and the timeout; the group says it is broken (so ``/health`` does);
the stopped process is killed and reaped; a long step that sends nothing is not mistaken for a
hang. The same for a server's stage worker process."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from parallel_helpers import busy

from glm_image.errors import GlmImageError, StageDied
from glm_image.stages import ProcessStage, StageSpec
from glm_image.stages.process import answer_seconds, process_state

TIMEOUT = 2.0  # seconds a busy rank may stay silent in these tests


def _gone(pids) -> bool:
    return all(not Path(f"/proc/{pid}").exists() for pid in pids)


def _wait_gone(pids, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not _gone(pids):
        time.sleep(0.1)
    return _gone(pids)


def _kill(pids) -> None:
    """Cleanup when a test failed half-way: no stopped process may outlive the test."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def sleep_then_rank(engine, seconds: float) -> int:
    """One long step that sends nothing (like a big GEMM): every rank sleeps, then answers."""
    import torch.distributed as dist

    time.sleep(seconds)
    return dist.get_rank()


def _call_in_thread(group, payload) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["value"] = group.run(payload)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=call)
    thread.start()
    return thread, outcome


def test_the_answer_timeout_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv("GLM_IMAGE_RANK_TIMEOUT", raising=False)
    assert answer_seconds() == 60.0 and answer_seconds(3) == 3.0
    monkeypatch.setenv("GLM_IMAGE_RANK_TIMEOUT", "7.5")
    assert answer_seconds() == 7.5
    for bad in ("soon", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("GLM_IMAGE_RANK_TIMEOUT", bad)
        with pytest.raises(GlmImageError, match=r"allowed: .*> 0"):
            answer_seconds()


@pytest.mark.parallel
def test_a_stopped_rank_fails_the_call_naming_it_and_is_reaped(tiny_checkpoint):
    group = ProcessStage(StageSpec("dit", str(tiny_checkpoint), sp=2), ["cpu", "cpu"], answer_seconds=TIMEOUT)
    pids = group.pids
    try:
        assert group.broken is None
        thread, outcome = _call_in_thread(group, functools.partial(busy, seconds=120))
        time.sleep(1.0)
        os.kill(pids[1], signal.SIGSTOP)
        started = time.monotonic()
        thread.join(30)
        assert not thread.is_alive(), "the call hung on a stopped rank"
        assert time.monotonic() - started < TIMEOUT + 8
        error = outcome.get("error")
        assert isinstance(error, StageDied), outcome
        message = str(error)
        assert f"rank 1 of 2 (pid {pids[1]}, cpu) stopped answering" in message
        assert "SIGSTOP" in message and f"within {TIMEOUT:g} s" in message
        assert group.broken == message  # what /health shows
        assert _wait_gone(pids), [process_state(p) for p in pids]  # killed while stopped, and reaped
        with pytest.raises(StageDied, match="stopped answering"):
            group.run(functools.partial(busy, seconds=0))
    finally:
        _kill(pids)
        group.close()


@pytest.mark.parallel
def test_a_long_silent_step_is_not_a_hang(tiny_checkpoint):
    """Each rank sleeps for three timeouts in one step, sending nothing: its heartbeat thread
    keeps answering, so the call succeeds."""
    with ProcessStage(
        StageSpec("dit", str(tiny_checkpoint), sp=2), ["cpu", "cpu"], answer_seconds=TIMEOUT
    ) as g:
        assert g.run(functools.partial(sleep_then_rank, seconds=3 * TIMEOUT)) == 0
        assert g.broken is None


@pytest.mark.parallel
def test_a_rank_stopped_between_calls_shows_in_broken_and_is_killed_at_close(tiny_checkpoint):
    group = ProcessStage(StageSpec("dit", str(tiny_checkpoint), sp=2), ["cpu", "cpu"], answer_seconds=TIMEOUT)
    pids = group.pids
    try:
        os.kill(pids[0], signal.SIGSTOP)
        time.sleep(0.2)
        assert group.broken is not None and f"rank 0 of 2 (pid {pids[0]}, cpu) is stopped" in group.broken
        started = time.monotonic()
        with pytest.raises(StageDied, match=rf"pid {pids[0]}.*stopped \(SIGSTOP\) between calls"):
            group.run(functools.partial(busy, seconds=0))
        assert time.monotonic() - started < 8  # at once: SIGKILL, no 5 s wait for a SIGTERM it cannot see
        assert _wait_gone(pids)
    finally:
        _kill(pids)
        group.close()


@pytest.mark.parallel
def test_close_kills_a_stopped_rank_without_sigcont(tiny_checkpoint):
    group = ProcessStage(StageSpec("dit", str(tiny_checkpoint), sp=2), ["cpu", "cpu"], answer_seconds=TIMEOUT)
    pids = group.pids
    try:
        os.kill(pids[1], signal.SIGSTOP)
        time.sleep(0.2)
        group.close()
        assert _gone(pids)
    finally:
        _kill(pids)


# ---------------------------------------------------------------- the server


@pytest.mark.parallel
def test_serve_with_a_stopped_rank_fails_the_request_reports_it_and_leaves_nothing(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """`serve --ar-tp 2` with one AR rank stopped: the request fails (500) naming the rank and pid
    and saying the server cannot generate any more (not that it keeps serving); /health is 503
    naming it; later requests are 503; SIGTERM ends the server and every rank, the stopped one too."""
    pytest.importorskip("fastapi", reason="needs the serve extra")
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from test_parallel_launch import _children
    from test_server import OPENAI, post, wait_until
    from test_server_stages import free_port, serve_command

    port = free_port()
    argv = [sys.executable, "-m", "glm_image.cli", "serve", "--model", str(tiny_checkpoint)]
    argv += ["--port", str(port), "--device", "cpu", "--output-dir", str(tmp_path), "--ar-tp", "2"]
    monkeypatch.setenv("GLM_IMAGE_RANK_TIMEOUT", str(TIMEOUT))  # the server reads it
    ranks: list[int] = []
    try:
        with serve_command(argv, port) as (process, url):
            ranks = [
                p
                for p in _children(process.pid)
                if b"stages.worker" in Path(f"/proc/{p}/cmdline").read_bytes()
            ]
            assert len(ranks) == 2
            body = {"prompt": "a cat", "size": "64x64", "steps": 2}
            assert post(url, OPENAI, body).status_code == 200
            # stopped while it decodes a long AR call (1281 tokens): once the ranks report tokens
            # (a fixed wait could end before the call is sent, on a busy machine)
            with ThreadPoolExecutor(1) as pool:
                long = {**body, "size": "1024x1024", "steps": 1}
                running = pool.submit(
                    post, url, OPENAI, long, headers={"X-Progress-Id": "rank-hang-progress"}
                )
                wait_until(lambda: _ar_done(url, "rank-hang-progress") > 0, timeout=120)
                os.kill(ranks[1], signal.SIGSTOP)
                started = time.monotonic()
                failed = running.result(timeout=60)
            assert time.monotonic() - started < TIMEOUT + 30
            assert failed.status_code == 500, failed.text
            message = failed.json()["error"]["message"]
            assert f"(pid {ranks[1]}, cpu) stopped answering" in message, message
            assert "keeps serving" not in message and "cannot generate any more" in message, message
            health = requests.get(url + "/health", timeout=10)
            assert health.status_code == 503 and f"pid {ranks[1]}" in health.json()["reason"]
            assert post(url, OPENAI, body).status_code == 503
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        assert _wait_gone(ranks)
    finally:
        _kill(ranks)


def _ar_done(url: str, tag: str) -> int:
    """The AR tokens the request sent with ``X-Progress-Id: tag`` has written (0 before it starts)."""
    import requests

    stages = requests.get(f"{url}/v1/progress/{tag}", timeout=10).json().get("stages", {})
    return stages.get("ar", {}).get("done", 0)
