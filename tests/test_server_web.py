"""The server's page and the endpoints it reads: progress by X-Progress-Id, the file listing, the
page's config; over HTTP (uvicorn in a thread), with a stand-in engine the test steps by hand.

The stand-in reports progress exactly as the engine does (``progress("ar", done, total)``, then
"dit"), and waits for the test before each next step, so what a poll sees is known. It makes a
flat image without the model: these tests are about the server, not the pixels (test_server.py
runs the real pipeline). The page in a real browser: test_web_page.py (marker ``browser``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

for _module in ("fastapi", "uvicorn"):
    pytest.importorskip(
        _module, reason='the server tests need the serve extra: pip install -e ".[test,serve]"'
    )

from glm_image.server.app import create_app  # noqa: E402
from glm_image.server.runner import ServerThread  # noqa: E402
from glm_image.server.settings import ServerSettings  # noqa: E402
from glm_image.server.web import RECOMMENDED_SIZES  # noqa: E402
from glm_image.stages.calls import GenerationOutput  # noqa: E402
from glm_image.validation import MAX_PROMPT_CHARS  # noqa: E402

OPENAI = "/v1/images/generations"
PAGE = Path(__file__).parents[1] / "glm_image" / "server" / "page"
PLAN = (("ar", 3), ("dit", 2))  # the stand-in's steps: 3 AR tokens, then 2 DiT steps


class SteppedPipe:
    """The real pipeline's API face (limits, checks, PNG text) over an engine the test steps."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.steps: queue.Queue = queue.Queue()  # one item lets the engine take one more step
        self.entered = threading.Event()

    def __getattr__(self, name):  # name, limits, validate_request, png_info
        return getattr(self.pipe, name)

    def run_batch(self, requests_, progress=None):
        self.entered.set()
        for stage, total in PLAN:
            for done in range(1, total + 1):
                progress(stage, done, total)  # raises Cancelled once every request is abandoned
                self.steps.get(timeout=20)
        images = [Image.new("RGB", (r.width, r.height), (200, 30, 30)) for r in requests_]
        seeds = tuple(r.seed or 0 for r in requests_)
        return [
            GenerationOutput([image], torch.zeros(1, 1, dtype=torch.long), (seed,))
            for image, seed in zip(images, seeds, strict=True)
        ]

    run = None  # image-to-image is not used here


@contextlib.contextmanager
def serving(pipe, out: Path, **options):
    app = create_app(pipe, ServerSettings(output_dir=out, steps=2, **options))
    with ServerThread(app) as url:
        yield url, app


def progress(url: str, tag: str, **kwargs) -> dict:
    r = requests.get(f"{url}/v1/progress/{tag}", timeout=10, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


def test_progress_follows_the_engine_stage_by_stage(glm, tmp_path):
    stepped = SteppedPipe(glm)
    tag = "a" * 32
    with serving(stepped, tmp_path) as (url, _), ThreadPoolExecutor(1) as pool:
        assert progress(url, tag) == {"id": tag, "state": "unknown", "stages": {}}  # not sent yet
        body = {"prompt": "p", "size": "64x64", "seed": 7}
        answer = pool.submit(
            requests.post, url + OPENAI, json=body, headers={"X-Progress-Id": tag}, timeout=60
        )
        seen = []
        expected = [(stage, done, total) for stage, total in PLAN for done in range(1, total + 1)]
        for index, (stage, done, total) in enumerate(expected):
            want = {stage: {"done": done, "total": total}}
            if stage == "dit":
                want = {"ar": {"done": 3, "total": 3}, **want}  # the AR stage's last numbers stay
            state = wait_for(lambda want=want: (p := progress(url, tag))["stages"] == want and p)
            seen.append(state)
            stepped.steps.put(index)
        assert all(s["state"] == "running" and s["id"] == tag for s in seen)
        r = answer.result()
        assert r.status_code == 200, r.text
        assert progress(url, tag)["state"] == "unknown"  # answered: the id is free again
        # the id may be used again once its request is answered
        stepped.entered.clear()
        again = pool.submit(
            requests.post, url + OPENAI, json=body, headers={"X-Progress-Id": tag}, timeout=60
        )
        assert stepped.entered.wait(10)
        for index in range(5):
            stepped.steps.put(index)
        assert again.result().status_code == 200


def test_a_queued_request_says_how_many_are_ahead_and_ids_are_checked(glm, tmp_path):
    stepped = SteppedPipe(glm)
    first, second = "f" * 20, "s" * 20
    with serving(stepped, tmp_path, max_batch=1) as (url, app), ThreadPoolExecutor(3) as pool:
        body = {"prompt": "p", "size": "64x64"}
        running = pool.submit(
            requests.post, url + OPENAI, json=body, headers={"X-Progress-Id": first}, timeout=60
        )
        assert stepped.entered.wait(10)
        waiting = pool.submit(
            requests.post, url + OPENAI, json=body, headers={"X-Progress-Id": second}, timeout=60
        )
        assert wait_for(lambda: progress(url, second)["state"] == "queued")
        assert progress(url, second) == {"id": second, "state": "queued", "ahead": 0, "stages": {}}
        assert progress(url, first)["state"] == "running"
        # an id in use is refused before the request queues; a malformed one names the header
        taken = requests.post(url + OPENAI, json=body, headers={"X-Progress-Id": first}, timeout=10)
        assert taken.status_code == 400 and taken.json()["error"]["param"] == "X-Progress-Id"
        assert "already names a request in progress" in taken.json()["error"]["message"]
        for bad in ("short", "x" * 65, "a/b" * 8, "ü" * 16):
            r = requests.post(url + OPENAI, json=body, headers={"X-Progress-Id": bad}, timeout=10)
            assert r.status_code == 400 and r.json()["error"]["param"] == "X-Progress-Id", bad
        assert requests.get(url + "/v1/progress/short", timeout=10).status_code == 400
        assert app.state.queue.depth == 1  # none of the refused ones queued
        for index in range(10):
            stepped.steps.put(index)
        assert running.result().status_code == 200 and waiting.result().status_code == 200


def test_closing_the_connection_cancels_a_running_request_and_frees_the_engine(glm, tmp_path):
    """What the page's Cancel button does (it aborts its fetch): the engine call stops at its next
    step, the server is idle again and keeps serving."""
    stepped = SteppedPipe(glm)
    tag = "c" * 32
    with serving(stepped, tmp_path) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        body = b'{"prompt": "long", "size": "64x64"}'
        with socket.create_connection((host, int(port))) as client:
            head = f"POST {OPENAI} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            head += f"X-Progress-Id: {tag}\r\nContent-Length: {len(body)}\r\n\r\n"
            client.sendall(head.encode() + body)
            wait_for(lambda: progress(url, tag)["stages"].get("ar", {}).get("done") == 1)
        # the server saw the client go (its answer is given up), then the engine's next step sees it
        wait_for(lambda: progress(url, tag)["state"] == "unknown")
        assert requests.get(url + "/health", timeout=10).json()["running"] == 1
        stepped.steps.put(0)
        wait_for(lambda: requests.get(url + "/health", timeout=10).json()["running"] == 0)
        health = requests.get(url + "/health", timeout=10).json()
        assert health["queue_depth"] == 0 and health["status"] == "ok"
        text = requests.get(url + "/metrics", timeout=10).text
        assert re.search(r"^glm_image_engine_calls_stopped_total 1$", text, re.M)
        assert re.search(r"^glm_image_images_generated_total 0$", text, re.M)
        stepped.entered.clear()
        for index in range(5):
            stepped.steps.put(index)
        r = requests.post(url + OPENAI, json={"prompt": "p", "size": "64x64"}, timeout=30)
        assert r.status_code == 200, r.text


def test_the_listing_is_newest_first_and_needs_the_key(glm, tmp_path):
    stepped = SteppedPipe(glm)
    key = {"Authorization": "Bearer k3y"}
    with serving(stepped, tmp_path, api_key="k3y") as (url, _):
        for index in range(15):
            stepped.steps.put(index)
        made = []
        for seed in (1, 2, 3):
            r = requests.post(
                url + OPENAI, json={"prompt": "p", "size": "64x64", "seed": seed}, headers=key, timeout=30
            )
            made.append(r.json()["data"][0]["url"])
            path = tmp_path / made[-1].rsplit("/", 1)[1]
            stamp = 1_700_000_000 + seed  # distinct times: a fast disk may give two files one mtime
            os.utime(path, (stamp, stamp))
        denied = requests.get(url + "/v1/files", timeout=10)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        listed = requests.get(url + "/v1/files", headers=key, timeout=10).json()["data"]
        assert [item["url"] for item in listed] == made[::-1]
        assert [item["created"] for item in listed] == [1_700_000_003, 1_700_000_002, 1_700_000_001]
        first = requests.get(made[-1], timeout=10).content
        assert listed[0]["bytes"] == len(first) and listed[0]["name"] == made[-1].rsplit("/", 1)[1]
        two = requests.get(url + "/v1/files?limit=2", headers=key, timeout=10).json()["data"]
        assert [item["url"] for item in two] == made[:0:-1]
        for bad in ("0", "101", "x", "-1", "1.5"):
            r = requests.get(url + f"/v1/files?limit={bad}", headers=key, timeout=10)
            assert r.status_code == 400 and r.json()["error"]["param"] == "limit", bad
        # progress needs the key too; the page and its files do not (the page asks for the key)
        assert requests.get(url + "/v1/progress/" + "a" * 16, timeout=10).status_code == 401
        assert requests.get(url + "/v1/web/config", timeout=10).status_code == 401
        assert requests.get(url + "/", timeout=10).status_code == 200
        assert requests.get(url + "/web/app.js", timeout=10).status_code == 200


def test_the_page_is_served_with_its_config(glm, tmp_path):
    with serving(SteppedPipe(glm), tmp_path, max_steps=80) as (url, _):
        page = requests.get(url + "/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.content == (PAGE / "index.html").read_bytes()
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            r = requests.get(f"{url}/web/{name}", timeout=10)
            assert r.headers["content-type"].startswith(kind) and r.content == (PAGE / name).read_bytes()
        for missing in ("/web/index.html", "/web/../app.py", "/web/secret.js"):
            assert requests.get(url + missing, timeout=10).status_code == 404, missing
        config = requests.get(url + "/v1/web/config", timeout=10).json()
        limits = glm.limits
        assert config["sizes"] == {
            "minimum": limits.minimum,
            "maximum": limits.maximum,
            "multiple": limits.multiple,
            "recommended": list(RECOMMENDED_SIZES),
        }
        assert config["steps"] == {"default": 2, "maximum": 80}
        assert config["prompt_max_chars"] == MAX_PROMPT_CHARS
        assert config["engine"] == {
            "ar_decoding": glm.ar_decoding,
            "jacobi_window": glm.jacobi_window,
            "dit_cache": None,
            "quantize": glm.quantize,
        }


def test_the_page_names_nothing_outside_this_server():
    """Every URL the page's files name is relative (this server); the browser test also records
    every request the page really makes."""
    for path in PAGE.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9]", text, re.I), path.name
        assert not re.search(r"@import|url\(", text), path.name
    for width, height in (s.split("x") for s in RECOMMENDED_SIZES):  # the model card's sizes
        assert int(width) % 32 == 0 and int(height) % 32 == 0
