"""`glm-image serve`: the real server (uvicorn on a loopback port, in a thread) on the tiny model.

Engine-timing cases (429, batching, timeouts, disconnects, failures) hold the engine with a gate
around the real pipeline, so they are deterministic: the test decides when the engine may run.
Every image is 64..96 pixels a side with one denoising step.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from glm_image.errors import GlmImageError
from glm_image.request import GenerationRequest

for _module in ("fastapi", "uvicorn"):  # the serve extra; skipped (and listed by -ra) without it
    pytest.importorskip(
        _module, reason='the server tests need the serve extra: pip install -e ".[test,serve]"'
    )

from glm_image.server.app import create_app  # noqa: E402
from glm_image.server.runner import ServerThread  # noqa: E402
from glm_image.server.settings import ServerSettings  # noqa: E402

BIGMODEL = "/api/paas/v4/images/generations"
OPENAI = "/v1/images/generations"
EDITS = "/v1/images/edits"


class GatedPipe:
    """The real pipeline behind a gate: engine calls wait until the test opens it, and are recorded."""

    def __init__(self, pipe, fail: Exception | None = None) -> None:
        self.pipe, self.fail = pipe, fail
        self.gate, self.entered = threading.Event(), threading.Event()
        self.calls: list[list[str]] = []

    def __getattr__(self, name):  # name, limits, validate_request, png_info
        return getattr(self.pipe, name)

    def _enter(self, requests_) -> None:
        self.calls.append([r.prompt for r in requests_])
        self.entered.set()
        assert self.gate.wait(20), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail

    def run_batch(self, requests_, progress=None):
        self._enter(requests_)
        return self.pipe.run_batch(requests_, progress)

    def run(self, request, progress=None):
        self._enter([request])
        return self.pipe.run(request, progress)


@contextlib.contextmanager
def serving(pipe, out: Path, **options):
    app = create_app(pipe, ServerSettings(output_dir=out, steps=1, **options))
    with ServerThread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def server(glm, tmp_path_factory):
    """One server for the cases that need no special engine: (url, app)."""
    with serving(glm, tmp_path_factory.mktemp("server") / "files") as running:
        yield running


def post(url: str, path: str, body: dict, **kwargs) -> requests.Response:
    # generous: a call may wait for a worker that is starting again, on a loaded machine
    return requests.post(url + path, json=body, **{"timeout": 300, **kwargs})


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


def depth_is(app, n: int):
    return lambda: app.state.queue.depth == n


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def b64_image(item: dict) -> Image.Image:
    return png(base64.b64decode(item["b64_json"]))


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    """Equal up to the last bit of a batched GEMM (what run_batch promises)."""
    diff = np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16))
    return a.size == b.size and diff.max() <= 1


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def metrics(url: str) -> dict[str, float]:
    return metric_values(requests.get(url + "/metrics", timeout=10).text)


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; checks every line is a comment or a sample."""
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) glm_image_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


# ---------------------------------------------------------------------------------------- generation


def test_bigmodel_returns_a_url_to_a_png_of_the_requested_size(server):
    url, _ = server
    before = int(time.time())
    r = post(
        url, BIGMODEL, {"model": "glm-image", "prompt": "a sign that says 'OPEN'", "size": "96x64", "seed": 5}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert before <= body["created"] <= time.time() + 1
    [item] = body["data"]
    assert re.fullmatch(re.escape(url) + r"/files/[0-9a-f]{32}\.png", item["url"]) and item["seed"] == 5
    download = requests.get(item["url"], timeout=10)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    image = png(download.content)
    assert image.size == (96, 64)  # WIDTHxHEIGHT
    assert image.text["prompt"] == "a sign that says 'OPEN'" and image.text["seed"] == "5"
    assert image.text["size"] == "96x64" and image.text["steps"] == "1"


def test_b64_json_on_both_endpoints_gives_the_seeds_images(server, glm):
    url, _ = server
    big = post(
        url,
        BIGMODEL,
        {"model": "glm-image", "prompt": "p", "size": "64x64", "seed": 9, "response_format": "b64_json"},
    )
    oai = post(
        url, OPENAI, {"prompt": "p", "size": "64x64", "seed": 9, "n": 2, "response_format": "b64_json"}
    )
    assert big.status_code == 200 and oai.status_code == 200, (big.text, oai.text)
    [one] = big.json()["data"]
    two = oai.json()["data"]
    assert "url" not in one and [item["seed"] for item in two] == [9, 10]
    images = [b64_image(one)] + [b64_image(item) for item in two]
    assert all(image.size == (64, 64) for image in images)
    assert same_pixels(images[0], images[1])  # same prompt, seed and size: the same image
    assert not same_pixels(images[1], images[2])  # seed 10 is another image
    alone = glm.run(GenerationRequest("p", 64, 64, steps=1, seed=10)).images[0]
    assert same_pixels(images[2], alone)


def test_openai_urls_are_distinct_files(server):
    url, app = server
    r = post(url, OPENAI, {"prompt": "two", "size": "64x96", "n": 2, "seed": 1, "model": "glm-image"})
    assert r.status_code == 200, r.text
    urls = [item["url"] for item in r.json()["data"]]
    assert len(set(urls)) == 2
    downloads = [requests.get(u, timeout=10).content for u in urls]
    assert [png(d).size for d in downloads] == [(64, 96), (64, 96)] and downloads[0] != downloads[1]
    assert not list(app.state.files.root.glob(".tmp-*"))  # written atomically: no temp file left


def test_the_servers_own_model_name_is_accepted(server, glm):
    url, _ = server
    body = {"model": str(glm.name), "prompt": "p", "size": "64x64", "response_format": "b64_json"}
    assert post(url, BIGMODEL, body).status_code == 200


def test_edits_with_one_and_two_images(server):
    url, _ = server
    fields = {"prompt": "make it red", "seed": "3", "response_format": "b64_json"}
    one = requests.post(url + EDITS, data=fields, files={"image": ("a.png", noise_png(96, 64))}, timeout=60)
    assert one.status_code == 200, one.text
    edited = b64_image(one.json()["data"][0])
    assert edited.size == (96, 64)  # no size: the first image's
    files = [("image[]", ("a.png", noise_png(64, 64, 1))), ("image[]", ("b.png", noise_png(64, 96, 2)))]
    two = requests.post(url + EDITS, data={**fields, "size": "64x64"}, files=files, timeout=60)
    assert two.status_code == 200, two.text
    assert b64_image(two.json()["data"][0]).size == (64, 64)
    plain = post(
        url, OPENAI, {"prompt": "make it red", "seed": 3, "size": "96x64", "response_format": "b64_json"}
    )
    assert not same_pixels(edited, b64_image(plain.json()["data"][0]))  # the image reached the engine


@pytest.mark.parametrize(
    ("files", "data", "param", "message"),
    [
        (
            {"image": ("a.png", noise_png(50, 64))},
            {},
            "image",
            "image[0] width = 50 is not allowed; allowed: {min}..{max}",
        ),
        ({"image": ("a.png", b"not a png")}, {}, "image", "image[0]: not a readable image"),
        ({}, {}, "image", "image: required"),
        (
            {"image": ("a.png", noise_png(64, 64)), "mask": ("m.png", noise_png(64, 64))},
            {},
            "mask",
            "mask: not supported",
        ),
        ({"image": ("a.png", noise_png(64, 64))}, {"n": "two"}, "n", "n = 'two'"),
        (
            {"image": ("a.png", noise_png(64, 64))},
            {"size": "64x2048"},
            "size",
            "allowed: {min}..{max} in multiples of {mul}",
        ),
    ],
)
def test_edits_reject_bad_input_naming_the_field(server, glm, files, data, param, message):
    url, _ = server
    form = {"prompt": (None, "p"), **{key: (None, value) for key, value in data.items()}, **files}
    r = requests.post(url + EDITS, files=form, timeout=30)  # (None, text): a plain form field
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    limits = glm.limits
    assert message.format(min=limits.minimum, max=limits.maximum, mul=limits.multiple) in error["message"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------- errors

LIMITS = "allowed: {min}..{max} in multiples of {mul}"


@pytest.mark.parametrize("path", [BIGMODEL, OPENAI])
@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"size": "2048x64"}, "size", "size = '2048x64': width = 2048 is not allowed; " + LIMITS),
        ({"size": "64x70"}, "size", "height = 70 is not allowed; " + LIMITS),
        ({"size": "big"}, "size", "expected WIDTHxHEIGHT"),
        ({"prompt": "x" * 1001}, "prompt", "prompt: 1001 characters; allowed: at most 1000"),
        ({"prompt": "  "}, "prompt", "prompt: must be a non-empty string"),
        ({"prompt": None}, "prompt", "prompt = None: Input should be a valid string"),
        ({"n": 11}, "n", "less than or equal to 10"),
        ({"response_format": "gif"}, "response_format", "'url' or 'b64_json'"),
        ({"style": "vivid"}, "style", "style: unknown field; allowed: prompt, size, n"),
        ({"steps": 0}, "steps", "steps: num_inference_steps = 0; allowed: an integer >= 1"),
        ({"steps": 201}, "steps", "steps = 201; allowed: 1..200"),
        ({"guidance": 0.5}, "guidance", "guidance: guidance_scale = 0.5; allowed: a number in 1..20"),
        ({"seed": "7"}, "seed", "seed = '7': Input should be a valid integer"),
        ({"seed": -1}, "seed", "seed = -1; allowed: an integer in 0.."),
    ],
)
def test_validation_errors_are_400_naming_the_field(server, glm, path, change, param, message):
    url, _ = server
    body = {"model": "glm-image", "prompt": "p", "size": "64x64", **change}
    r = post(url, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    limits = glm.limits
    assert message.format(min=limits.minimum, max=limits.maximum, mul=limits.multiple) in error["message"]
    if path == BIGMODEL:
        assert set(error) == {"code", "message"} and error["code"] == "1214"
    else:
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["param"] == param


def test_missing_fields_and_bad_json(server):
    url, _ = server
    r = post(url, BIGMODEL, {"prompt": "p"})
    assert r.status_code == 400 and r.json()["error"] == {"code": "1213", "message": "model: required"}
    r = post(url, OPENAI, {"size": "64x64"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    assert r.json()["error"]["param"] == "prompt"
    r = requests.post(
        url + OPENAI, data=b"{not json", headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body: not valid JSON")


def test_unknown_model_is_404_in_the_endpoints_style(server):
    url, _ = server
    r = post(url, BIGMODEL, {"model": "cogview-4", "prompt": "p", "size": "64x64"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "1211" and "'cogview-4' does not exist; allowed: glm-image" in r.text
    r = post(url, OPENAI, {"model": "dall-e-3", "prompt": "p", "size": "64x64"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"


def test_bearer_auth(glm, tmp_path):
    with serving(glm, tmp_path, api_key="s3cret") as (url, _):
        body = {"model": "glm-image", "prompt": "p", "size": "64x64"}
        missing = post(url, BIGMODEL, {"not": "even valid"})  # auth comes before validation
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "1001"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = post(url, BIGMODEL, body, headers={"Authorization": "Bearer s3cre"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "1002"
        basic = post(url, OPENAI, body, headers={"Authorization": "Basic czNjcmV0"})
        assert basic.status_code == 401 and basic.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(url + "/metrics", timeout=10).status_code == 401
        assert requests.get(url + "/health", timeout=10).status_code == 200  # liveness stays open
        good = post(url, OPENAI, body, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200, good.text
        # a returned URL is the capability (128 random bits), fetchable without the header
        assert requests.get(good.json()["data"][0]["url"], timeout=10).status_code == 200


def test_full_queue_is_429_and_the_queued_work_still_runs(glm, tmp_path):
    gated = GatedPipe(glm)
    with serving(gated, tmp_path, max_queue=1) as (url, app), ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, url, OPENAI, {"prompt": "running", "size": "64x64"})
        assert gated.entered.wait(10)
        queued = pool.submit(post, url, OPENAI, {"prompt": "queued", "size": "64x64"})
        wait_until(depth_is(app, 1))
        big = post(url, BIGMODEL, {"model": "glm-image", "prompt": "one too many", "size": "64x64"})
        oai = post(url, OPENAI, {"prompt": "one too many", "size": "64x64"})
        assert big.status_code == 429 and big.json()["error"]["code"] == "1302"
        assert oai.status_code == 429 and oai.json()["error"]["code"] == "rate_limit_exceeded"
        assert "queue is full (1 requests waiting)" in oai.json()["error"]["message"]
        gated.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert gated.calls == [["running"], ["queued"]]


def test_same_size_requests_share_one_engine_call_and_keep_their_images(glm, tmp_path):
    gated = GatedPipe(glm)
    body = {"size": "64x64", "response_format": "b64_json"}
    with serving(gated, tmp_path) as (url, app), ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, url, OPENAI, {**body, "prompt": "first"})
        assert gated.entered.wait(10)
        waiting = []
        for prompt, size, seed in (("a", "64x64", 11), ("other size", "96x64", 1), ("b", "64x64", 40)):
            waiting.append(
                pool.submit(post, url, OPENAI, {**body, "prompt": prompt, "size": size, "seed": seed})
            )
            wait_until(depth_is(app, len(waiting)))
        gated.gate.set()
        a, other, b = (future.result() for future in waiting)
        assert first.result().status_code == 200 and other.status_code == 200
    assert gated.calls == [["first"], ["a", "b"], ["other size"]]  # one call for a and b
    image_a, image_b = b64_image(a.json()["data"][0]), b64_image(b.json()["data"][0])
    assert not same_pixels(image_a, image_b)
    for image, prompt, seed in ((image_a, "a", 11), (image_b, "b", 40)):
        alone = glm.run(GenerationRequest(prompt, 64, 64, steps=1, seed=seed)).images[0]
        assert same_pixels(image, alone)


def test_engine_failure_is_500_with_an_error_id_and_the_server_keeps_serving(glm, tmp_path):
    gated = GatedPipe(glm, fail=RuntimeError("CUDA out of memory at 0xdeadbeef"))
    gated.gate.set()
    with serving(gated, tmp_path) as (url, _):
        r = post(url, BIGMODEL, {"model": "glm-image", "prompt": "p", "size": "64x64"})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["code"] == "500" and re.fullmatch(r"[0-9a-f]{16}", error["error_id"])
        assert error["error_id"] in error["message"] and r.headers["x-error-id"] == error["error_id"]
        assert "deadbeef" not in r.text  # internals stay in the server log
        r = post(url, OPENAI, {"prompt": "p", "size": "64x64"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        gated.fail = None
        r = post(url, OPENAI, {"prompt": "p", "size": "64x64"})
        assert r.status_code == 200 and len(r.json()["data"]) == 1


def test_a_request_past_its_timeout_is_504_and_leaves_the_queue(glm, tmp_path):
    gated = GatedPipe(glm)
    with serving(gated, tmp_path, timeout=1.0) as (url, app), ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, url, OPENAI, {"prompt": "running", "size": "64x64"})
        assert gated.entered.wait(10)
        late = post(url, BIGMODEL, {"model": "glm-image", "prompt": "late", "size": "64x64"})
        assert late.status_code == 504 and late.json()["error"]["code"] == "504"
        assert app.state.queue.depth == 0
        assert running.result().status_code == 504  # its engine call outlived the timeout too
        gated.gate.set()  # the engine starts the abandoned call, and stops it at its first step
        wait_until(lambda: metrics(url)["glm_image_engine_calls_stopped_total"] == 1)
        values = metrics(url)
        assert values['glm_image_jobs_dropped_total{reason="timeout"}'] == 1  # only the queued one
        assert values["glm_image_images_generated_total"] == 0
        assert values["glm_image_engine_failures_total"] == 0
    assert gated.calls == [["running"]]  # "late" never reached the engine


def test_a_client_that_disconnects_while_queued_is_dropped(glm, tmp_path):
    gated = GatedPipe(glm)
    with serving(gated, tmp_path) as (url, app), ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, url, OPENAI, {"prompt": "running", "size": "64x64"})
        assert gated.entered.wait(10)
        host, port = url.removeprefix("http://").split(":")
        body = b'{"prompt": "gone", "size": "64x64"}'
        with socket.create_connection((host, int(port))) as client:
            head = f"POST {OPENAI} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            client.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(depth_is(app, 1))
        wait_until(depth_is(app, 0))
        gated.gate.set()
        assert running.result().status_code == 200
        assert metrics(url)['glm_image_jobs_dropped_total{reason="disconnected"}'] == 1
    assert gated.calls == [["running"]]


# ---------------------------------------------------------------------------------------- files


def raw_get(url: str, target: str) -> tuple[int, bytes]:
    """GET with the request target sent exactly as given (no client-side normalisation)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_files_accept_only_ids_this_server_wrote(server):
    url, app = server
    r = post(url, OPENAI, {"prompt": "p", "size": "64x64"})
    name = r.json()["data"][0]["url"].rsplit("/", 1)[1]
    root = app.state.files.root
    (root.parent / "secret.png").write_bytes(b"SECRET")
    (root / "secret.png").write_bytes(b"SECRET")
    planted = "0123456789abcdef0123456789abcdef.png"
    (root / planted).write_bytes(b"SECRET")  # the right pattern, but not written by the server
    assert raw_get(url, f"/files/{name}")[0] == 200
    attacks = [
        "/files/../secret.png",
        "/files/..%2Fsecret.png",
        "/files/..%2f..%2f..%2fetc%2fpasswd",
        "/files/%2e%2e%2fsecret.png",
        "/files/%2e%2e",
        "/files/..%5Csecret.png",
        "/files//etc/passwd",
        "/files/%2Fetc%2Fpasswd",
        f"/files/{root.parent}/secret.png",
        f"/files/{str(root.parent / 'secret.png').replace('/', '%2F')}",
        f"/files/{name}/../../secret.png",
        f"/files/{name}%00",
        f"/files/{name}%0A",
        f"/files/{name.upper()}",
        f"/files/{name[:-4]}",
        "/files/secret.png",
        f"/files/{planted}",
        f"{url}/files/..%2Fsecret.png",  # absolute-form request target
    ]
    for target in attacks:
        status, content = raw_get(url, target)
        assert status in (400, 404), target
        assert b"SECRET" not in content and b"root:" not in content, target


# ---------------------------------------------------------------------------------------- health, metrics, CLI


def test_health_and_metrics(glm, tmp_path):
    with serving(glm, tmp_path) as (url, _):
        health = requests.get(url + "/health", timeout=10).json()
        limits = glm.limits
        assert health["status"] == "ok" and health["queue_depth"] == 0 and health["max_queue"] == 32
        assert health["sizes"] == {
            "minimum": limits.minimum,
            "maximum": limits.maximum,
            "multiple": limits.multiple,
        }
        assert "glm-image" in health["models"] and str(glm.name) in health["models"]
        assert health["executor"] == {"mode": "in-process", "device": "cpu"}
        assert post(url, OPENAI, {"prompt": "p", "size": "64x64", "n": 2}).status_code == 200
        assert post(url, BIGMODEL, {"model": "glm-image", "prompt": "p", "size": "64x64"}).status_code == 200
        assert post(url, OPENAI, {"prompt": "p", "size": "1x1"}).status_code == 400
        response = requests.get(url + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = metric_values(response.text)
    assert values["glm_image_queue_depth"] == 0 and values["glm_image_queue_capacity"] == 32
    assert values["glm_image_images_generated_total"] == 3 and values["glm_image_engine_calls_total"] == 2
    assert values['glm_image_requests_total{endpoint="/v1/images/generations",status="200"}'] == 1
    assert values['glm_image_requests_total{endpoint="/v1/images/generations",status="400"}'] == 1
    assert values['glm_image_requests_total{endpoint="/api/paas/v4/images/generations",status="200"}'] == 1
    # one stage (the whole engine call): busy while it ran, never beside another stage
    assert values['glm_image_stage_busy_seconds_total{stage="engine"}'] > 0
    assert values['glm_image_stage_calls{stage="engine"}'] == 0
    assert values["glm_image_stage_overlap_seconds_total"] == 0
    for stage, count in (("ar", 2), ("dit", 2), ("vae", 2), ("queue_wait", 2), ("total", 2)):
        buckets = [
            v for k, v in values.items() if k.startswith(f'glm_image_stage_seconds_bucket{{stage="{stage}"')
        ]
        assert buckets == sorted(buckets) and buckets[-1] == count  # cumulative, +Inf last
        assert values[f'glm_image_stage_seconds_count{{stage="{stage}"}}'] == count
        assert values[f'glm_image_stage_seconds_sum{{stage="{stage}"}}'] > 0


def test_serve_settings_from_the_command_line(monkeypatch, tmp_path):
    from glm_image.cli import build_parser
    from glm_image.server.arguments import settings_from_args

    argv = ["serve", "--api-key-env", "GLM_TEST_KEY", "--output-dir", str(tmp_path), "--max-queue", "3"]
    monkeypatch.delenv("GLM_TEST_KEY", raising=False)
    with pytest.raises(
        GlmImageError, match="--api-key-env GLM_TEST_KEY: that environment variable is not set"
    ):
        settings_from_args(build_parser().parse_args(argv))
    monkeypatch.setenv("GLM_TEST_KEY", "k")
    settings = settings_from_args(build_parser().parse_args(argv))
    assert settings.api_key == "k" and settings.max_queue == 3 and settings.model_names == ("tiny",)
    with pytest.raises(GlmImageError, match="max_queue = 0; allowed: an integer >= 1"):
        settings_from_args(build_parser().parse_args([*argv, "--max-queue", "0"]))


def test_glm_image_serve_command(tiny_checkpoint, tmp_path):
    """The console command end to end: loads the model once, listens, answers, stops on SIGTERM."""
    import tempfile

    from test_server_stages import free_port, read_log, serve_command

    port = free_port()
    command = [sys.executable, "-m", "glm_image.cli", "serve", "--model", str(tiny_checkpoint)]
    command += ["--port", str(port), "--output-dir", str(tmp_path / "files"), "--steps", "1"]
    with tempfile.TemporaryFile() as output:
        with serve_command(command, port, output) as (process, url):
            r = post(url, BIGMODEL, {"model": "glm-image", "prompt": "p", "size": "64x64"})
            assert r.status_code == 200 and png(
                requests.get(r.json()["data"][0]["url"], timeout=10).content
            ).size == (64, 64)
            process.terminate()
            process.wait(timeout=30)
        log = read_log(output)
    assert f"POST {BIGMODEL} 200" in log and "Traceback" not in log
