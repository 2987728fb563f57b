"""`serve --stages separate --batching continuous`: the AR scheduler lives in the AR worker
process and the server drives it tick by tick (``stages.ticks``, ``server.ticking``); the DiT
worker takes one request at a time. Each image must equal its solo image through the same
workers bit for bit (and the in-process pipeline's within the last bit; a request naming a LoRA
adapter gets it applied in the workers), a client that leaves must free its slot, the page must
see the AR's progress, and a killed AR worker must fail the requests it held, no other, with
a new worker serving the next ones. Tiny model, CPU, two worker processes."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from glm_image.errors import GlmImageError
from glm_image.request import GenerationRequest

pytest.importorskip("fastapi", reason='the server tests need the serve extra: pip install -e ".[test,serve]"')

import requests
from test_continuous_server import assert_ar_progress_is_seen, metrics, wait_until

from glm_image.errors import error_of, reply_of
from glm_image.server.app import create_app
from glm_image.server.executors import ModelFront
from glm_image.server.runner import ServerThread
from glm_image.server.settings import ServerSettings
from glm_image.server.workers import staged_processes
from glm_image.stages.ticks import Tick, tick

OPENAI = "/v1/images/generations"


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    """(url, executor) of a continuous server over two stage workers, 3 AR rows, holding a LoRA
    adapter ``a`` (AR and DiT) that requests may name (``serve --lora a=PATH``)."""
    from lora_helpers import peft_ar, peft_dit

    root = tmp_path_factory.mktemp("continuous-stages")
    peft_ar(tiny_checkpoint, root / "a" / "vision_language_encoder", seed=1)
    peft_dit(tiny_checkpoint, root / "a" / "transformer", seed=2, lora_alpha=8)
    front = ModelFront.from_checkpoint(str(tiny_checkpoint))
    executor = staged_processes(
        front,
        str(tiny_checkpoint),
        device="cpu",
        named_lora=[("a", str(root / "a"), 1.0)],
        batching="continuous",
        max_rows=3,
    )
    front.lora_scales = {"a": 1.0}
    settings = ServerSettings(output_dir=root / "files", steps=1)
    with ServerThread(create_app(front, settings, executor), startup_timeout=180) as url:
        yield url, executor


def post(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(url + OPENAI, json={**body, "response_format": "b64_json"}, timeout=300, **kwargs)


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def solo_images(glm, body: dict) -> list[np.ndarray]:
    width, height = map(int, body["size"].split("x"))
    request = GenerationRequest(
        body["prompt"], width, height, steps=1, seed=body["seed"], num_images=body.get("n", 1)
    )
    return [np.asarray(image.convert("RGB")) for image in glm.run(request).images]


def test_overlapping_requests_get_their_solo_images_from_the_workers(served, glm):
    url, _ = served
    bodies = [
        {"prompt": "a tall blue 'SIGN'", "size": "128x96", "seed": 5},
        {"prompt": "两个红色的圆", "size": "64x64", "seed": 7, "n": 2},
        {"prompt": "a wide field", "size": "64x128", "seed": 9, "lora": {"name": "a", "scale": 0.8}},
    ]
    before = metrics(url)
    with ThreadPoolExecutor(len(bodies)) as pool:
        first = pool.submit(post, url, bodies[0])
        wait_until(lambda: metrics(url)["glm_image_ar_running_rows"] >= 1 or first.done())
        answers = [first, *(pool.submit(post, url, body) for body in bodies[1:])]  # join mid-decode
        answers = [answer.result() for answer in answers]
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status_code == 200, answer.text
        got = [pixels(item) for item in answer.json()["data"]]
        # alone, through the same workers: bit for bit (what ran beside it changed nothing)
        alone = [pixels(item) for item in post(url, body).json()["data"]]
        # the in-process pipeline: the same tokens; pixels within the last bit of a GEMM that
        # runs on other threads here than in the worker
        expected = solo_images(glm, body)
        assert len(got) == len(alone) == len(expected)
        for image, one, pipeline in zip(got, alone, expected, strict=True):
            assert np.array_equal(image, one)
            if "lora" in body:  # the worker applied the request's adapter, to its rows alone
                assert np.abs(image.astype(int) - pipeline).max() > 10
            else:
                assert np.abs(image.astype(int) - pipeline).max() <= 1
    values = metrics(url)
    assert values["glm_image_ar_max_rows"] == 3 and values["glm_image_ar_running_rows"] == 0
    iterations = values["glm_image_ar_iterations_total"] - before["glm_image_ar_iterations_total"]
    rows = values["glm_image_ar_row_iterations_total"] - before["glm_image_ar_row_iterations_total"]
    assert rows > iterations > 0  # rows of different requests ran in the same iterations
    assert values["glm_image_images_generated_total"] - before["glm_image_images_generated_total"] == 8
    health = requests.get(url + "/health", timeout=10).json()["executor"]
    assert health["mode"] == "continuous" and health["ar"]["max_rows"] == 3
    assert health["ar"]["pid"] != health["dit"]["pid"] != os.getpid()


def test_the_page_sees_the_ar_progress_of_a_worker(served):
    assert_ar_progress_is_seen(served[0], "w" * 32)


def test_a_client_that_leaves_frees_its_slot_in_the_worker(served, glm):
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    before = metrics(url)
    body = b'{"prompt": "gone", "size": "128x96"}'
    with socket.create_connection((host, int(port))) as client:
        head = f"POST {OPENAI} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        client.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: metrics(url)["glm_image_ar_running_rows"] == 1)
    stopped = before["glm_image_engine_calls_stopped_total"] + 1
    wait_until(lambda: metrics(url)["glm_image_engine_calls_stopped_total"] == stopped)
    wait_until(lambda: metrics(url)["glm_image_ar_running_rows"] == 0)
    # the worker dropped it: its row ran far fewer iterations than its 246 tokens
    rows = metrics(url)["glm_image_ar_row_iterations_total"] - before["glm_image_ar_row_iterations_total"]
    assert rows < 234 + 12, rows
    body = {"prompt": "next", "size": "64x64", "seed": 1}
    answer = post(url, body)
    assert answer.status_code == 200 and np.array_equal(
        pixels(answer.json()["data"][0]), solo_images(glm, body)[0]
    )


def test_a_killed_ar_worker_fails_the_requests_it_held_and_a_new_one_serves(served, glm):
    """Last of the module's server tests: it replaces the AR worker."""
    url, _ = served
    first = requests.get(url + "/health", timeout=10).json()["executor"]["ar"]["pid"]
    before = metrics(url)
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(post, url, {"prompt": f"held {i}", "size": "256x256"}) for i in range(2)]
        wait_until(lambda: metrics(url)["glm_image_ar_running_rows"] == 2)
        os.kill(first, signal.SIGKILL)
        answers = [h.result() for h in held]
    for answer in answers:
        assert answer.status_code == 500, answer.text
        message = answer.json()["error"]["message"]
        assert f"the ar stage worker (pid {first}, cpu) stopped with signal SIGKILL" in message, message
    body = {"prompt": "after", "size": "64x64", "seed": 3}
    again = post(url, body)  # the new worker's scheduler
    assert again.status_code == 200, again.text
    assert np.abs(pixels(again.json()["data"][0]).astype(int) - solo_images(glm, body)[0]).max() <= 1
    health = requests.get(url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["executor"]["ar"]["restarts"] == 1
    assert health["executor"]["ar"]["pid"] != first
    after = metrics(url)
    assert after["glm_image_ar_running_rows"] == 0
    for counter in ("iterations", "row_iterations", "busy_seconds"):  # counted on across workers
        name = f"glm_image_ar_{counter}_total"
        assert after[name] > before[name], name


def test_a_tick_answers_errors_as_a_handle_raises_them(tiny_checkpoint):
    """A request the worker's scheduler refuses comes back as its error, in the handle's words,
    while the others go on (the tick function on an engine of this process)."""
    from glm_image.engine import ArEngine
    from glm_image.stages import ArCall

    engine = ArEngine.from_pretrained(tiny_checkpoint)  # its own: a scheduler stays with it
    good = ArCall(("p",), 64, 64, (2,))
    bad = ArCall(("p",), 65, 64, (3,))  # not a multiple of the patch: refused at submit
    answer = tick(Tick(max_rows=2, submit=((1, good), (2, bad)), iterations=10_000, seconds=60), engine)
    done = {request: (prior, reply) for request, prior, reply in answer.done}
    assert done[2][0] is None and done[2][1][0] == "invalid" and "65" in done[2][1][1]
    assert type(error_of(*done[2][1], "the ar stage")) is GlmImageError
    while 1 not in done:  # the good one decodes on
        answer = tick(Tick(max_rows=2, iterations=10_000, seconds=60), engine)
        done.update({r: (p, e) for r, p, e in answer.done})
    prior, reply = done[1]
    assert reply is None
    assert torch.equal(prior.prior_token_ids, engine.generate("p", 64, 64, seeds=[2]).prior_tokens.cpu())
    kind, text = reply_of(RuntimeError("boom"))
    assert kind == "error" and "RuntimeError: boom" in str(error_of(kind, text, "rank 0 of the ar stage"))


def test_the_counters_count_on_across_a_replaced_worker():
    """/metrics' AR counters never go back: a new worker's scheduler starts at 0, and the
    driver adds the old worker's last numbers to it."""
    from glm_image.engine.scheduler import SchedulerStats
    from glm_image.server.ticking import TickedRows
    from glm_image.stages.ticks import Ticked

    class Runner:
        broken = None

    rows = TickedRows(Runner(), max_rows=4)
    rows._answer(Ticked([], {}, SchedulerStats(4, 2, 0, 100, 180, 1.5), "invariant"))
    rows._answer(Ticked([], {}, SchedulerStats(4, 1, 0, 120, 200, 2.0), "invariant"))
    assert (rows.stats().iterations, rows.stats().row_iterations, rows.stats().busy_seconds) == (
        120,
        200,
        2.0,
    )
    rows._answer(
        Ticked([], {}, SchedulerStats(4, 1, 0, 3, 3, 0.25), "invariant")
    )  # the new worker's first tick
    assert (rows.stats().iterations, rows.stats().row_iterations, rows.stats().busy_seconds) == (
        123,
        203,
        2.25,
    )
    assert rows.stats().running_rows == 1 and rows.mode == "invariant"
