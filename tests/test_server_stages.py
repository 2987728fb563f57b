"""`glm-image serve` with the AR and the DiT as separate stages (issue 16, item 4): one batch's AR
runs while the previous batch's DiT runs, only ``PriorTokens`` crossing between them.

The stages run in worker processes (the real ``--stages separate``) or, where a test must reach
into an engine (a fault), in threads of this process. Tiny model, 64..96 pixels, 1-8 steps; the
images are compared with what the in-process pipeline gives for the same request.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from PIL import Image

from glm_image.errors import GlmImageError
from glm_image.request import GenerationRequest

pytest.importorskip("fastapi", reason='the server tests need the serve extra: pip install -e ".[test,serve]"')

from test_server import (
    BIGMODEL,
    OPENAI,
    b64_image,
    metrics,
    noise_png,
    png,
    post,
    same_pixels,
    wait_until,
)

from glm_image.server.app import create_app
from glm_image.server.executors import ModelFront, StagedExecutor
from glm_image.server.runner import ServerThread
from glm_image.server.settings import ServerSettings
from glm_image.server.workers import staged_processes
from glm_image.stages import LocalStage


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def worker_pids(url: str) -> dict[str, int]:
    stages = requests.get(url + "/health", timeout=10).json()["executor"]
    return {stage: stages[stage]["pid"] for stage in ("ar", "dit")}


def record_spans(executor) -> list[tuple[str, float, float, tuple[str, ...]]]:
    """Wrap the executor's two runners: (stage, start, end, prompts) of every call, as the
    server process saw it."""
    spans = []
    for stage in ("ar", "dit"):
        runner = getattr(executor, stage)
        original = runner.run

        async def timed(payload, abandoned, original=original, stage=stage):
            prompts = payload.prompts if stage == "ar" else payload.prior.prompts
            start = time.perf_counter()
            try:
                return await original(payload, abandoned)
            finally:
                spans.append((stage, start, time.perf_counter(), prompts))

        runner.run = timed
    return spans


def overlapping(spans) -> list[tuple]:
    """Pairs (dit span, ar span) of different calls that ran at the same time."""
    dits = [s for s in spans if s[0] == "dit"]
    ars = [s for s in spans if s[0] == "ar"]
    return [(d, a) for d in dits for a in ars if a[3] != d[3] and a[1] < d[2] and d[1] < a[2]]


@pytest.fixture(scope="module")
def staged(tiny_checkpoint, tmp_path_factory):
    """A server whose stages are two worker processes: (url, app)."""
    front = ModelFront.from_checkpoint(str(tiny_checkpoint))
    executor = staged_processes(front, str(tiny_checkpoint), device="cpu")
    settings = ServerSettings(output_dir=tmp_path_factory.mktemp("staged"), steps=2, max_batch=4)
    app = create_app(front, settings, executor)
    with ServerThread(app, startup_timeout=180) as url:
        pids = worker_pids(url)
        yield url, app
    assert not any(alive(pid) for pid in pids.values()), "a stage worker outlived the server"


def test_concurrent_requests_each_get_their_own_image(staged, glm):
    """Five requests at once, two sizes: each gets exactly one PNG of its size, distinct from
    the others, and the image the in-process pipeline gives for the same request."""
    url, _ = staged
    sizes = ["64x64", "96x64", "64x64", "64x64", "96x64"]
    bodies = [
        {
            "prompt": f"a sign that says 'OPEN {i}'",
            "size": size,
            "seed": 100 + i,
            "response_format": "b64_json",
        }
        for i, size in enumerate(sizes)
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(url, OPENAI, body), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    images = {}
    for body, response in zip(bodies, responses, strict=True):
        [item] = response.json()["data"]
        assert item["seed"] == body["seed"]
        images[body["prompt"]] = image = b64_image(item)
        assert (
            image.size == tuple(map(int, body["size"].split("x"))) and image.text["prompt"] == body["prompt"]
        )
    assert len({image.tobytes() for image in images.values()}) == len(bodies)
    for size in set(sizes):  # the in-process pipeline, one batched call per size
        width, height = map(int, size.split("x"))
        same = [
            GenerationRequest(b["prompt"], width, height, steps=2, seed=b["seed"])
            for b in bodies
            if b["size"] == size
        ]
        for request, output in zip(same, glm.run_batch(same), strict=True):
            assert same_pixels(images[request.prompt], output.images[0])


def test_one_requests_ar_runs_while_another_requests_dit_runs(staged):
    url, app = staged
    spans = record_spans(app.state.executor)
    before = metrics(url)["glm_image_stage_overlap_seconds_total"]
    bodies = [{"prompt": f"overlap {i}", "size": "96x64", "seed": i, "steps": 8} for i in range(4)]
    bodies[0]["steps"] = 200  # its DiT runs about a second here, long after the others arrive
    dit_calls = 'glm_image_stage_calls{stage="dit"}'
    started = metrics(url)[dit_calls]
    with ThreadPoolExecutor(len(bodies)) as pool:
        # the first request is a batch of its own; the others are sent once its DiT has started,
        # so their AR call (one batch: they arrive together) runs inside its DiT call. (Sent
        # after it was done, they would share one call with nothing left to overlap; sent with
        # it, as a loaded machine can make them arrive, all four would share one call.)
        first = pool.submit(post, url, OPENAI, bodies[0])
        wait_until(lambda: metrics(url)[dit_calls] > started, timeout=120)
        rest = [pool.submit(post, url, OPENAI, body) for body in bodies[1:]]
        responses = [first.result(), *(r.result() for r in rest)]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    # each call went through both stages, once
    calls = {stage: sorted(p for s, _, _, ps in spans if s == stage for p in ps) for stage in ("ar", "dit")}
    assert calls["ar"] == calls["dit"] == sorted(body["prompt"] for body in bodies)
    # the timings show it: an AR call of one batch inside the DiT call of another
    assert overlapping(spans), spans
    assert metrics(url)["glm_image_stage_overlap_seconds_total"] > before


def test_both_api_shapes_and_image_to_image(staged, glm):
    url, _ = staged
    r = post(url, BIGMODEL, {"model": "glm-image", "prompt": "p", "size": "64x96", "seed": 3})
    assert r.status_code == 200, r.text
    image = png(requests.get(r.json()["data"][0]["url"], timeout=10).content)
    assert image.size == (64, 96)
    fields = {"prompt": "make it red", "seed": "4", "response_format": "b64_json", "steps": "2"}
    edit = requests.post(
        url + "/v1/images/edits", data=fields, files={"image": ("a.png", noise_png(64, 64))}, timeout=60
    )
    assert edit.status_code == 200, edit.text
    condition = Image.open(io.BytesIO(noise_png(64, 64))).convert("RGB")
    alone = glm.run(GenerationRequest("make it red", 64, 64, steps=2, seed=4, images=(condition,)))
    assert same_pixels(b64_image(edit.json()["data"][0]), alone.images[0])


def test_a_client_that_leaves_stops_its_call_in_the_worker(staged):
    """The client of a long DiT call disconnects: the worker stops the call at its next step
    (long before its 200 steps end), and the next request is served."""
    url, _ = staged
    before = metrics(url)["glm_image_engine_calls_stopped_total"]
    host, port = url.removeprefix("http://").split(":")
    body = b'{"prompt": "gone", "size": "96x96", "steps": 200}'
    with socket.create_connection((host, int(port))) as client:
        head = f"POST {OPENAI} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        client.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: metrics(url)['glm_image_stage_calls{stage="dit"}'] == 1, timeout=60)
    left = time.perf_counter()
    wait_until(lambda: metrics(url)["glm_image_engine_calls_stopped_total"] == before + 1, timeout=30)
    stopped_after = time.perf_counter() - left
    r = post(url, OPENAI, {"prompt": "next", "size": "64x64", "steps": 1})
    assert r.status_code == 200, r.text
    assert metrics(url)['glm_image_stage_calls{stage="dit"}'] == 0
    assert stopped_after < 10, stopped_after


def test_a_request_past_its_timeout_never_reaches_the_dit(glm, tmp_path):
    """Stages in threads: a request whose AR outlives its timeout is a 504; its AR call stops
    at its next step and no DiT call is made for it."""
    executor = StagedExecutor.in_threads(glm)
    held = HeldAr(glm.ar)
    executor.ar.handle = LocalStage("ar", held)
    spans = record_spans(executor)
    app = create_app(ModelFront.of(glm), ServerSettings(output_dir=tmp_path, steps=1, timeout=1.0), executor)
    with ServerThread(app) as url:
        late = post(url, BIGMODEL, {"model": "glm-image", "prompt": "late", "size": "64x64"})
        assert late.status_code == 504 and late.json()["error"]["code"] == "504"
        held.gate.set()
        wait_until(lambda: metrics(url)["glm_image_engine_calls_stopped_total"] == 1)
        assert metrics(url)["glm_image_images_generated_total"] == 0
    assert [stage for stage, *_ in spans] == ["ar"]


# ---------------------------------------------------------------------------------------- faults


class HeldAr:
    """The AR engine, its first call held until the test opens the gate."""

    def __init__(self, ar) -> None:
        self.ar, self.gate, self.entered = ar, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.ar, name)

    def generate(self, *args, **options):
        if not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return self.ar.generate(*args, **options)


class NanFor:
    """The DiT engine with NaN latents for the prompts that hold ``word`` (a broken kernel)."""

    def __init__(self, dit, word: str) -> None:
        self.dit, self.word = dit, word

    def __getattr__(self, name):
        return getattr(self.dit, name)

    def denoise(self, prior, prompts, *rest, **options):
        latents = self.dit.denoise(prior, prompts, *rest, **options)
        bad = torch.tensor([self.word in p for p in prompts]).view(-1, *[1] * (latents.dim() - 1))
        return torch.where(bad, float("nan"), latents)


def test_a_failing_request_fails_alone_in_a_staged_batch(glm, tmp_path):
    """Stages in threads, a DiT that returns NaN for one prompt: that request is a 500 with an
    error id, the ones batched with it get their images (the batch reruns each alone)."""
    executor = StagedExecutor.in_threads(glm)
    held = HeldAr(glm.ar)
    executor.ar.handle, executor.dit.handle = (
        LocalStage("ar", held),
        LocalStage("dit", NanFor(glm.dit, "POISON")),
    )
    spans = record_spans(executor)
    app = create_app(ModelFront.of(glm), ServerSettings(output_dir=tmp_path, steps=1, max_batch=4), executor)
    bodies = [{"prompt": p, "size": "64x64", "seed": i} for i, p in enumerate(["hold", "a", "POISON b", "c"])]
    with ServerThread(app) as url, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, url, OPENAI, bodies[0])]
        assert held.entered.wait(10)
        for waiting, body in enumerate(bodies[1:], start=1):
            futures.append(pool.submit(post, url, OPENAI, body))
            wait_until(lambda n=waiting: app.state.queue.depth == n)
        held.gate.set()  # the three waiting requests now share one engine call
        responses = [f.result() for f in futures]
        values = metrics(url)
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 500, 200], [r.text for r in responses]
    error = responses[2].json()["error"]
    assert re.fullmatch(r"[0-9a-f]{16}", error["error_id"]) and "NaN or Inf" in error["message"]
    assert values["glm_image_engine_batches_split_total"] >= 1
    dit_calls = [ps for stage, _, _, ps in spans if stage == "dit"]
    assert dit_calls == [("hold",), ("a", "POISON b", "c"), ("a",), ("POISON b",), ("c",)]


def command(tiny_checkpoint, port: int, out, *more: str) -> list[str]:
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
    return [*argv, "--output-dir", str(out), "--steps", "1", "--stages", "separate", *more]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_log(log) -> str:
    """Everything written to the binary file ``log`` so far, as text."""
    log.seek(0)
    return log.read().decode(errors="replace")


@contextlib.contextmanager
def serve_command(argv: list[str], port: int, log=None):
    """The server command in a process of its own, until the block ends (killed if still up);
    yields (process, url) once /health answers. Its output goes to ``log`` (a binary file the
    caller reads with ``read_log``; default a temporary one), not a pipe: a pipe nobody reads
    fills up with the request log (a line per poll of /metrics) and then blocks the server."""
    import tempfile

    own = log is None
    log = tempfile.TemporaryFile() if own else log  # noqa: SIM115 (the server's lifetime)
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, read_log(log)[-5000:]
        with contextlib.suppress(requests.RequestException):  # not listening yet, or slow to answer
            return requests.get(url + "/health", timeout=5).status_code == 200
        return False

    try:
        wait_until(up, timeout=300)  # a cold process: imports and the model load, on a loaded machine
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        if own:
            log.close()


def test_a_killed_worker_fails_its_request_and_nothing_outlives_the_server(tiny_copy, tmp_path):
    """SIGKILL the DiT worker mid-request: that request is a 500 with an error id naming the
    stage; a new worker starts and serves the next request. A worker that cannot start again
    (its weights gone) leaves the server up, answering 503 and saying why in /health. Then
    SIGKILL the server itself (no shutdown code runs): no worker, old or new, is left. (A
    graceful stop is the ``staged`` fixture's exit.)"""
    port = free_port()
    with serve_command(command(tiny_copy, port, tmp_path), port) as (process, url):
        first = worker_pids(url)
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(post, url, OPENAI, {"prompt": "long", "size": "96x96", "steps": 200})
            wait_until(lambda: metrics(url)['glm_image_stage_calls{stage="dit"}'] == 1, timeout=60)
            os.kill(first["dit"], signal.SIGKILL)
            r = long.result()
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert re.fullmatch(r"[0-9a-f]{16}", error["error_id"]) and error["type"] == "server_error"
        assert (
            f"the dit stage worker (pid {first['dit']}, cpu) stopped with signal SIGKILL while it ran a call"
            in error["message"]
        ), error["message"]
        assert "a new one is starting" in error["message"] and "keeps serving" in error["message"]
        again = post(url, OPENAI, {"prompt": "after", "size": "64x64"})  # waits for the new worker
        assert again.status_code == 200, again.text
        health = requests.get(url + "/health", timeout=10).json()
        assert health["status"] == "ok" and health["executor"]["dit"]["restarts"] == 1
        second = worker_pids(url)
        assert second["ar"] == first["ar"] and second["dit"] != first["dit"]

        shutil.rmtree(tiny_copy / "transformer")  # the next DiT worker cannot load
        os.kill(second["dit"], signal.SIGKILL)  # idle: found dead when the next call comes
        refused = post(url, BIGMODEL, {"model": "glm-image", "prompt": "p", "size": "64x64"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "503", refused.text
        assert "the dit stage worker died and could not start again" in refused.json()["error"]["message"]
        health = requests.get(url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert "could not start again" in health.json()["reason"]
        assert post(url, OPENAI, {"prompt": "p", "size": "64x64"}).status_code == 503  # refused at once
        process.kill()
    wait_until(lambda: not any(alive(pid) for pid in (*first.values(), *second.values())), timeout=10)


def test_a_stopped_worker_fails_its_request_and_is_replaced(tiny_checkpoint, tmp_path, monkeypatch):
    """SIGSTOP the DiT worker mid-request (issue 23: the server's workers are the same process
    handle as the ranks, heartbeat included): the request fails within the answer timeout naming
    the worker and its pid, the stopped process is killed, and a new worker serves the next one."""
    monkeypatch.setenv("GLM_IMAGE_RANK_TIMEOUT", "2")  # the server reads it
    port = free_port()
    with serve_command(command(tiny_checkpoint, port, tmp_path), port) as (process, url):
        first = worker_pids(url)
        try:
            with ThreadPoolExecutor(1) as pool:
                long = pool.submit(post, url, OPENAI, {"prompt": "long", "size": "96x96", "steps": 200})
                wait_until(lambda: metrics(url)['glm_image_stage_calls{stage="dit"}'] == 1, timeout=60)
                started = time.monotonic()
                os.kill(first["dit"], signal.SIGSTOP)
                r = long.result(timeout=60)
            assert time.monotonic() - started < 30
            assert r.status_code == 500, r.text
            message = r.json()["error"]["message"]
            assert f"the dit stage worker (pid {first['dit']}, cpu) stopped answering" in message, message
            assert "a new one is starting" in message, message
            wait_until(lambda: not alive(first["dit"]), timeout=15)  # killed, though stopped
            again = post(url, OPENAI, {"prompt": "after", "size": "64x64"})
            assert again.status_code == 200, again.text
            assert worker_pids(url)["dit"] != first["dit"]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(first["dit"], signal.SIGKILL)
            process.kill()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ar-device", "cpu"], "--ar-device needs --stages separate"),
        (["--stage-threads", "2"], "--stage-threads needs --stages separate"),
        (["--stages", "separate", "--ray"], "Ray always runs the stages as separate deployments"),
        (["--stages", "separate", "--stage-threads", "0"], "--stage-threads 0; allowed: an integer >= 1"),
        (["--stages", "separate", "--residency", "swap"], "--residency swap: with --stages separate"),
        (["--stages", "separate", "--max-memory", "12GB"], "--max-memory 12GB: with --stages separate"),
        (["--dit-replicas", "3"], "--dit-replicas needs --ray"),
        (["--ray", "--dit-replicas", "4-2"], "--dit-replicas '4-2'; allowed: N"),
        (["--ray", "--ar-gpus", "-1"], "--ar-gpus -1.0; allowed: a number >= 0"),
        (["--ray", "--dit-gpus", "1.5"], "--dit-gpus 1.5; allowed: at most 1 (a replica of one rank)"),
        (["--ray", "--ar-gpus", "4", "--ar-tp", "2"], "--ar-gpus 4 with 2 rank(s) per AR replica"),
        (["--ray", "--ar-gpus", "1", "--ar-tp", "2"], "allowed: --ar-gpus 2, or 0 (the ranks on the CPU)"),
        (["--ray", "--dit-gpus", "2", "--dit-sp", "4"], "--dit-gpus 2 with 4 rank(s) per DiT replica"),
        (["--ray", "--placement", "separate"], "--placement separate with --ray"),
        (["--ray", "--batching", "continuous"], "with --ray use --batching static (or auto)"),
        (
            ["--stages", "separate", "--ar-tp", "2"],
            "--stages separate runs each stage in one worker on one device",
        ),
    ],
)
def test_stage_and_ray_flags_are_checked(flags, message):
    from glm_image.cli import build_parser
    from glm_image.server.arguments import ray_options_from_args, stage_options_from_args

    args = build_parser().parse_args(["serve", *flags])
    with pytest.raises(GlmImageError, match=re.escape(message)):
        stage_options_from_args(args)
        ray_options_from_args(args)


def test_stage_and_ray_flags_become_options():
    from glm_image.cli import build_parser
    from glm_image.server.arguments import ray_options_from_args, stage_options_from_args

    parse = build_parser().parse_args
    args = parse(["serve", "--stages", "separate", "--ar-device", "cpu", "--dit-device", "cpu:0"])
    stages = stage_options_from_args(args)
    assert (stages.ar_device, stages.dit_device, stages.threads) == ("cpu", "cpu:0", None)
    ray = ray_options_from_args(
        parse(["serve", "--ray", "--ar-replicas", "2", "--dit-replicas", "1-6", "--dit-gpus", "1"])
    )
    assert (
        ray.ar_replicas == (2, 2) and ray.dit_replicas == (1, 6) and ray.dit_gpus == 1 and ray.ar_gpus is None
    )
    assert (
        stage_options_from_args(parse(["serve"])) is None and ray_options_from_args(parse(["serve"])) is None
    )
    # a replica's ranks: from the parallel flags, or one per GPU
    ranks = ray_options_from_args(parse(["serve", "--ray", "--ar-gpus", "4", "--dit-gpus", "6"]))
    assert (ranks.ar_tp, ranks.dit_cfg, ranks.dit_sp, ranks.ranks) == (4, 2, 3, (4, 6))
    odd = ray_options_from_args(parse(["serve", "--ray", "--dit-gpus", "3"]))
    assert (odd.dit_cfg, odd.dit_sp) == (1, 3)
    cpu = ray_options_from_args(
        parse(["serve", "--ray", "--ar-tp", "2", "--dit-cfg-parallel", "--ar-gpus", "0"])
    )
    assert cpu.ranks == (2, 2) and cpu.ar_gpus == 0 and cpu.dit_gpus is None
    given = ray_options_from_args(parse(["serve", "--ray", "--dit-gpus", "4", "--dit-sp", "4"]))
    assert (given.dit_cfg, given.dit_sp) == (1, 4)


def test_a_serve_config_s_yaml_values_reach_the_parser_typed():
    """A Ray Serve config's ``args`` as YAML types them (issue 23: ``dit_cache_taylor: true`` was
    ``--dit-cache-taylor True``, "unrecognized arguments"): a boolean is the bare flag or nothing,
    a number its text, parsed by ``serve``'s own parser (not the root CLI's)."""
    from glm_image.server.arguments import config_argv, serve_parser

    args = {"dit_cache_taylor": True, "stage_threads": None, "ar_replicas": 2, "guidance": 2.5}
    assert config_argv({**args, "ray": False}) == [
        "--dit-cache-taylor",
        "--ar-replicas",
        "2",
        "--guidance",
        "2.5",
    ]
    parsed = serve_parser().parse_args(["serve", "--ray", *config_argv(args)])
    assert parsed.dit_cache_taylor is True and parsed.ar_replicas == "2" and parsed.guidance == 2.5
    assert (
        serve_parser().parse_args(["serve", *config_argv({"dit_cache_taylor": False})]).dit_cache_taylor
        is False
    )
