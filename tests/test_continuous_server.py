"""`serve --batching continuous` (``server.continuous``): the real server on the tiny model,
requests overlapping in the AR scheduler. Each image must equal its solo image
(``GlmImage.run``) exactly, a client that leaves must free its slot, and limits answer 429/503
with a message. The scheduler's own exactness cases are in ``test_continuous_batching.py``."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from glm_image.errors import GlmImageError
from glm_image.request import GenerationRequest

for _module in ("fastapi", "uvicorn"):
    pytest.importorskip(
        _module, reason='the server tests need the serve extra: pip install -e ".[test,serve]"'
    )

from glm_image.server.app import create_app  # noqa: E402
from glm_image.server.continuous import ContinuousExecutor, executor_for  # noqa: E402
from glm_image.server.runner import ServerThread  # noqa: E402
from glm_image.server.settings import ServerSettings  # noqa: E402

OPENAI = "/v1/images/generations"


@contextlib.contextmanager
def _serve(glm, out, max_rows: int, **options):
    """(url, executor) of a continuous-batching server on ``glm``."""
    settings = ServerSettings(output_dir=out, steps=1, **options)
    executor = ContinuousExecutor(glm, max_rows=max_rows)
    with ServerThread(create_app(glm, settings, executor)) as url:
        yield url, executor


def post(url: str, body: dict) -> requests.Response:
    return requests.post(url + OPENAI, json=body, timeout=300)


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def test_overlapping_requests_get_their_solo_images_exactly(glm, tmp_path):
    bodies = [
        {"prompt": "a red circle", "size": "64x64", "seed": 5},
        {"prompt": "two blue 'SIGNS'", "size": "96x64", "seed": 7, "n": 2},
        {"prompt": "a wide field", "size": "64x128", "seed": 9},
    ]
    with _serve(glm, tmp_path, max_rows=3) as (url, _), ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: post(url, {**b, "response_format": "b64_json"}), bodies))
        values = metrics(url)
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status_code == 200, answer.text
        width, height = map(int, body["size"].split("x"))
        request = GenerationRequest(
            body["prompt"],
            width=width,
            height=height,
            steps=1,
            seed=body["seed"],
            num_images=body.get("n", 1),
        )
        solo = glm.run(request)
        got = [pixels(item) for item in answer.json()["data"]]
        assert len(got) == len(solo.images)
        for image, alone in zip(got, solo.images, strict=True):
            assert np.array_equal(image, np.asarray(alone.convert("RGB")))  # bit for bit, not within 1
    assert values["glm_image_ar_max_rows"] == 3 and values["glm_image_ar_running_rows"] == 0
    assert values["glm_image_ar_row_iterations_total"] >= values["glm_image_ar_iterations_total"] > 0
    assert values["glm_image_dit_queue"] == 0
    assert values["glm_image_images_generated_total"] == 4


def test_a_client_that_disconnects_frees_its_slot(glm, tmp_path):
    with _serve(glm, tmp_path, max_rows=1) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        body = b'{"prompt": "gone", "size": "256x256"}'  # decodes for seconds: it leaves mid-decode
        with socket.create_connection((host, int(port))) as client:
            head = f"POST {OPENAI} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            client.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: metrics(url)["glm_image_ar_running_rows"] == 1)
        wait_until(lambda: metrics(url)["glm_image_engine_calls_stopped_total"] == 1)
        values = metrics(url)
        assert values["glm_image_ar_running_rows"] == 0  # the slot is free again
        assert values["glm_image_images_generated_total"] == 0
        answer = post(url, {"prompt": "next", "size": "64x64", "seed": 1})
        assert answer.status_code == 200 and len(answer.json()["data"]) == 1


def test_limits_answer_429_and_503_with_a_message(glm, tmp_path):
    with _serve(glm, tmp_path, max_rows=1, max_queue=1) as (url, _), ThreadPoolExecutor(2) as pool:
        # long enough (about 1300 tokens) to still run while the steps below look at the queue
        running = pool.submit(post, url, {"prompt": "running", "size": "256x256", "seed": 1})
        wait_until(lambda: metrics(url)["glm_image_ar_running_rows"] == 1)
        queued = pool.submit(post, url, {"prompt": "queued", "size": "64x64", "seed": 2})
        wait_until(lambda: metrics(url)["glm_image_queue_depth"] == 1)
        full = post(url, {"prompt": "one too many", "size": "64x64"})
        assert full.status_code == 429
        assert "queue is full (1 requests waiting)" in full.json()["error"]["message"]
        assert running.result().status_code == 200 and queued.result().status_code == 200
    with _serve(glm, tmp_path, max_rows=1) as (url, executor):
        executor.rows.broken = "the AR scheduler stopped (RuntimeError)"  # as its thread records a fault
        answer = post(url, {"prompt": "p", "size": "64x64"})
        assert answer.status_code == 503
        assert "the AR scheduler stopped" in answer.json()["error"]["message"]


def test_batching_choices_are_checked(glm):
    with pytest.raises(GlmImageError, match="batching = 'beam'; allowed: auto, continuous, static"):
        executor_for(glm, "beam")
    with pytest.raises(GlmImageError, match="max_rows = 0; allowed: an integer >= 1"):
        executor_for(glm, "continuous", 0)
    assert executor_for(glm, "static") is None
    assert isinstance(executor_for(glm, "auto"), ContinuousExecutor)

    class Staged:  # the AR in worker processes: what --stages separate serves
        ar = object()

    assert executor_for(Staged(), "auto") is None
    with pytest.raises(GlmImageError, match="not available here: the AR stage does not run in this process"):
        executor_for(Staged(), "continuous")


def assert_ar_progress_is_seen(url: str, tag: str) -> None:
    """A 128x96 request sent with progress id ``tag``: the page's AR bar (``/v1/progress``),
    polled while it runs, shows its tokens rising to their total."""
    body = {"prompt": "a tall 'SIGN'", "size": "128x96", "seed": 4}
    seen = []
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            requests.post, url + OPENAI, json=body, headers={"X-Progress-Id": tag}, timeout=300
        )
        while not answer.done():
            stages = requests.get(f"{url}/v1/progress/{tag}", timeout=10).json().get("stages", {})
            if "ar" in stages:
                seen.append((stages["ar"]["done"], stages["ar"]["total"]))
            time.sleep(0.005)
        assert answer.result().status_code == 200, answer.result().text
    total = 234 + 12  # tiny at 128x96: the preview grid, then the target grid
    assert {t for _, t in seen} == {total}, seen
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(set(done)) >= 2 and done[-1] <= total, seen


def test_progress_shows_the_ar_tokens_of_a_continuous_request(glm, tmp_path):
    """The page's AR bar (``X-Progress-Id``): the request's tokens as the scheduler writes them."""
    with _serve(glm, tmp_path, max_rows=2) as (url, _):
        assert_ar_progress_is_seen(url, "c" * 32)
