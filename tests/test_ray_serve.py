"""`glm-image serve --ray` (issue 17): the same API on Ray Serve, the AR and the DiT as separate
deployments, on a local Ray instance (2 CPUs, the tiny model, 64..256 pixels, 1-2 steps).

Starting Ray takes tens of seconds, so these tests run only when asked for (``-m ray``; CI runs
them as a step of their own) and need the ray extra (``pip install -e ".[test,ray]"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from glm_image.request import GenerationRequest

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray", reason='the Ray tests need the ray extra: pip install -e ".[test,ray]"')
psutil = pytest.importorskip("psutil")

from ray import serve  # noqa: E402
from test_server import (  # noqa: E402
    BIGMODEL,
    EDITS,
    OPENAI,
    b64_image,
    metrics,
    noise_png,
    png,
    post,
    same_pixels,
    wait_until,
)
from test_server_stages import free_port, read_log, serve_command  # noqa: E402

from glm_image.errors import (  # noqa: E402
    Cancelled,
    GlmImageError,
    NonFiniteError,
    StageDied,
)
from glm_image.server.ray_app import APP_NAME, RayStage, build  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _only_when_asked(request):  # module scope: runs before the module's Ray fixture
    if not re.search(r"(?<!not )\bray\b", request.config.option.markexpr or ""):
        pytest.skip("starts a local Ray instance: run with -m ray (a CI step of its own)")


def ray_processes() -> set[int]:
    """Every Ray daemon and worker on this machine (raylet, gcs_server, ray::* workers)."""
    found = set()
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            words = " ".join(process.info["cmdline"] or [process.info["name"] or ""])
            if re.search(r"\braylet\b|\bgcs_server\b|^ray::", words):
                found.add(process.pid)
    return found


def test_serve_ray_command_starts_and_stops_cleanly(tiny_checkpoint, tmp_path):
    """Runs before any other test of this module starts Ray here: the command's local Ray
    instance is the only one, and after Ctrl-C none of its processes is left."""
    before = ray_processes()
    port = free_port()
    argv = [sys.executable, "-m", "glm_image.cli", "serve", "--ray", "--model", str(tiny_checkpoint)]
    argv += ["--port", str(port), "--output-dir", str(tmp_path), "--steps", "1"]
    argv += ["--ar-cpus", "0.5", "--dit-cpus", "0.5", "--dit-replicas", "2"]
    with tempfile.TemporaryFile() as output:
        with serve_command(argv, port, output) as (process, url):
            r = post(url, BIGMODEL, {"model": "glm-image", "prompt": "p", "size": "64x64"})
            assert r.status_code == 200, r.text
            assert png(requests.get(r.json()["data"][0]["url"], timeout=10).content).size == (64, 64)
            health = requests.get(url + "/health", timeout=10).json()
            assert health["executor"]["mode"] == "ray" and health["executor"]["dit"]["slots"] == 2
            started = {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
            assert ray_processes() - before, "no Ray process was started"
            process.send_signal(signal.SIGINT)  # Ctrl-C
            assert process.wait(timeout=120) == 0
        text = read_log(output)
    assert "Traceback" not in text, text[-3000:]
    wait_until(
        lambda: (
            not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in started)
        ),
        timeout=30,
    )
    assert not (ray_processes() - before), "Ray processes outlived glm-image serve --ray"


def deploy(tiny_checkpoint, out, **flags) -> None:
    args = {"model": str(tiny_checkpoint), "output_dir": str(out), "steps": 2}
    args |= {"dit_replicas": 2, "ar_cpus": 0.5, "dit_cpus": 0.5, **flags}
    serve.run(build(args), name=APP_NAME, route_prefix="/")


@pytest.fixture(scope="module")
def ray_server(tiny_checkpoint, tmp_path_factory):
    """One AR replica and two DiT replicas on a local 2-CPU Ray instance: (url, output dir)."""
    port, out = free_port(), tmp_path_factory.mktemp("ray-files")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(tiny_checkpoint, out)
        yield f"http://127.0.0.1:{port}", out
    finally:
        serve.shutdown()
        ray.shutdown()


def test_both_api_shapes_through_ray(ray_server, glm):
    url, out = ray_server
    big = post(url, BIGMODEL, {"model": "glm-image", "prompt": "a sign 'OPEN'", "size": "96x64", "seed": 5})
    assert big.status_code == 200, big.text
    [item] = big.json()["data"]
    assert re.fullmatch(re.escape(url) + r"/files/[0-9a-f]{32}\.png", item["url"]) and item["seed"] == 5
    image = png(requests.get(item["url"], timeout=10).content)  # served by the ingress, from --output-dir
    assert image.size == (96, 64) and image.text["seed"] == "5" and image.text["steps"] == "2"
    assert (out / item["url"].rsplit("/", 1)[1]).is_file()
    alone = glm.run(GenerationRequest("a sign 'OPEN'", 96, 64, steps=2, seed=5)).images[0]
    assert same_pixels(image, alone)  # the stages apart on Ray: the pipeline's image

    oai = post(
        url, OPENAI, {"prompt": "p", "size": "64x64", "seed": 9, "n": 2, "response_format": "b64_json"}
    )
    assert oai.status_code == 200, oai.text
    assert [item["seed"] for item in oai.json()["data"]] == [9, 10]
    both = glm.run(GenerationRequest("p", 64, 64, steps=2, seed=9, num_images=2)).images
    for item, expected in zip(oai.json()["data"], both, strict=True):
        assert same_pixels(b64_image(item), expected)

    edit = requests.post(
        url + EDITS,
        data={"prompt": "make it red", "seed": "3", "response_format": "b64_json"},
        files={"image": ("a.png", noise_png(64, 64))},
        timeout=60,
    )
    assert edit.status_code == 200 and b64_image(edit.json()["data"][0]).size == (64, 64), edit.text

    bad = post(url, BIGMODEL, {"model": "glm-image", "prompt": "p", "size": "64x70"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "1214"  # the same errors
    assert post(url, OPENAI, {"prompt": "p", "style": "vivid"}).json()["error"]["param"] == "style"


def check_one_distinct_png_each(url: str, bodies: list[dict], responses: list) -> None:
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:300] for r in responses]
    seen_urls, seen_pixels = set(), set()
    for body, response in zip(bodies, responses, strict=True):
        data = response.json()["data"]
        assert len(data) == 1 and data[0]["seed"] == body["seed"]
        image = png(requests.get(data[0]["url"], timeout=10).content)
        assert (
            image.size == tuple(map(int, body["size"].split("x"))) and image.text["prompt"] == body["prompt"]
        )
        seen_urls.add(data[0]["url"])
        seen_pixels.add(image.tobytes())
    assert len(seen_urls) == len(seen_pixels) == len(bodies)


def test_eight_concurrent_requests_each_get_one_distinct_png_of_its_size(ray_server):
    url, _ = ray_server
    before = metrics(url)["glm_image_images_generated_total"]
    sizes = ["64x64", "96x64", "64x96", "64x64", "96x64", "64x64", "64x96", "64x64"]
    bodies = [{"prompt": f"sign {i}", "size": size, "seed": 40 + i} for i, size in enumerate(sizes)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(url, OPENAI, body), bodies))
    check_one_distinct_png_each(url, bodies, responses)
    assert metrics(url)["glm_image_images_generated_total"] == before + len(bodies)


def dit_replicas() -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if "ServeReplica:glm-image:DitStage" in " ".join(p.info["cmdline"] or [])
    ]


def busiest(processes: list[psutil.Process], seconds: float = 0.3) -> psutil.Process:
    """The process that used the most CPU over ``seconds``: the replica running a call."""

    def used(p):
        times = p.cpu_times()
        return times.user + times.system

    before = [used(p) for p in processes]
    time.sleep(seconds)
    return max(zip(processes, before, strict=True), key=lambda pair: used(pair[0]) - pair[1])[0]


def test_a_dit_replica_killed_during_a_load_run_loses_no_request(ray_server):
    """SIGKILL the DiT replica that is running a call while eight requests are in flight: its
    call goes once more to the other replica; every request gets exactly one image of its own,
    and no image is made twice."""
    url, _ = ray_server
    before = metrics(url)
    sizes = ["256x256", "224x256", "256x224", "256x256", "224x256", "256x224", "256x256", "224x224"]
    bodies = [
        {"prompt": f"load {i}", "size": size, "seed": 70 + i, "steps": 60} for i, size in enumerate(sizes)
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(post, url, OPENAI, body) for body in bodies]
        wait_until(lambda: metrics(url)['glm_image_stage_calls{stage="dit"}'] >= 1, timeout=120)
        victim = busiest(dit_replicas())
        victim.kill()
        responses = [f.result() for f in futures]
    check_one_distinct_png_each(url, bodies, responses)
    after = metrics(url)
    assert after["glm_image_images_generated_total"] == before["glm_image_images_generated_total"] + len(
        bodies
    )
    assert after["glm_image_engine_failures_total"] == before["glm_image_engine_failures_total"]
    assert not victim.is_running()
    # the call it was running was sent once more, to the other replica
    assert requests.get(url + "/health", timeout=10).json()["executor"]["dit"]["retries"] == 1


def test_a_full_queue_is_429_as_in_one_process(ray_server, tiny_checkpoint):
    """Redeployed with room for one waiting request: the third of three at once is refused."""
    url, out = ray_server
    deploy(tiny_checkpoint, out, max_queue=1)
    bodies = [
        {"prompt": f"q {i}", "size": size, "seed": i}
        for i, size in enumerate(["64x64", "96x64", "64x96", "96x96"])
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(url, OPENAI, body), bodies))
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in responses), [r.text for r in responses]
    error = refused[0].json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "queue is full (1 requests waiting)" in error["message"]
    assert refused[0].headers["retry-after"] == "1"


def test_a_replica_of_two_gloo_ranks_writes_the_image_of_one_process(ray_server, tiny_checkpoint, glm):
    """Redeployed with an AR replica of 2 tensor-parallel ranks and a DiT replica of 2 CFG ranks
    (``dit_cfg_parallel: true``, a YAML boolean), each a ``ProcessStage`` of rank processes the
    replica spawned, over gloo (num_gpus 0): the images are those of one process."""
    url, out = ray_server
    deploy(tiny_checkpoint, out, ar_tp=2, dit_cfg_parallel=True, dit_replicas=1)
    health = requests.get(url + "/health", timeout=10).json()["executor"]
    assert health["ar"]["handle"] == health["dit"]["handle"] == "ray"
    ranks = [  # under this test's Ray instance (others may run ranks on this machine)
        p
        for p in psutil.Process().children(recursive=True)
        if "glm_image.stages.worker" in " ".join(p.cmdline())
    ]
    parents = {" ".join(p.parent().cmdline()) for p in ranks}
    assert len(ranks) == 4, "2 AR + 2 DiT rank processes"
    assert all("ServeReplica:glm-image" in name for name in parents), parents  # spawned by the replicas
    body = {"prompt": "a sign 'OPEN'", "size": "96x64", "seed": 11, "n": 2, "response_format": "b64_json"}
    r = post(url, OPENAI, body)
    assert r.status_code == 200, r.text
    alone = glm.run(GenerationRequest("a sign 'OPEN'", 96, 64, steps=2, seed=11, num_images=2)).images
    for item, expected in zip(r.json()["data"], alone, strict=True):
        image = b64_image(item)
        assert same_pixels(image, expected)
        assert image.text["parallel"] == "AR tensor parallel x2, DiT CFG x2 (placement: same)"


def test_a_request_through_ray_gets_the_adapter_it_names(ray_server, tiny_checkpoint, tmp_path_factory):
    """Redeployed with ``lora: [style=PATH:0.8]`` (a YAML list: the flag once per entry): the
    adapter is checked on a replica of each stage at start, /health lists it, and a request that
    names it gets the image one process makes with it."""
    from lora_helpers import peft_ar, peft_dit

    from glm_image import GlmImage

    root = tmp_path_factory.mktemp("ray-lora") / "style"
    peft_ar(tiny_checkpoint, root / "vision_language_encoder")
    peft_dit(tiny_checkpoint, root / "transformer", lora_alpha=8)
    url, out = ray_server
    deploy(tiny_checkpoint, out, lora=[f"style={root}:0.8"], dit_replicas=1)
    assert requests.get(url + "/health", timeout=10).json()["lora"] == [{"name": "style", "scale": 0.8}]
    body = {"prompt": "p", "size": "64x64", "seed": 3, "response_format": "b64_json"}
    chosen = post(url, OPENAI, {**body, "lora": {"name": "style"}})
    plain = post(url, OPENAI, body)
    assert chosen.status_code == 200 and plain.status_code == 200, chosen.text + plain.text
    pipe = GlmImage.from_pretrained(tiny_checkpoint, device="cpu")  # the session's glm keeps no adapter
    request = GenerationRequest("p", 64, 64, steps=2, seed=3)
    expected = pipe.run(dataclasses.replace(request, lora=((str(root), 0.8),))).images[0]
    assert same_pixels(b64_image(chosen.json()["data"][0]), expected)
    assert same_pixels(b64_image(plain.json()["data"][0]), pipe.run(request).images[0])


# ---------------------------------------------------------------------------------------- the runner alone


class FakeResponse:
    """A ``DeploymentResponse`` that gives ``outcome`` (raises it, if an exception) once ``delay``
    seconds have passed; ``result`` waits as Serve's does, up to ``timeout_s``."""

    def __init__(self, outcome, delay: float = 0.0) -> None:
        self.outcome, self.ready_at, self.cancelled = outcome, time.monotonic() + delay, False

    def result(self, timeout_s: float | None = None):
        wait = self.ready_at - time.monotonic()
        if timeout_s is not None and wait > timeout_s:
            time.sleep(timeout_s)
            raise TimeoutError("Timed out resolving to ObjectRef.")
        time.sleep(max(0.0, wait))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A deployment handle whose calls give ``outcomes`` in turn."""

    deployment_name = "DitStage"

    def __init__(self, *outcomes, delay: float = 0.0) -> None:
        self.outcomes, self.delay, self.sent, self.responses = list(outcomes), delay, [], []

    @property
    def run(self):
        return self

    def remote(self, payload):
        self.sent.append(payload)
        self.responses.append(FakeResponse(self.outcomes.pop(0), self.delay))
        return self.responses[-1]


def test_a_ray_stage_is_a_stage_handle_the_server_s_runner_holds():
    from glm_image.server.executors import HandleRunner
    from glm_image.stages import StageHandle

    stage = RayStage("dit", FakeHandle("images", delay=0.3))
    assert isinstance(stage, StageHandle) and stage.broken is None
    runner = HandleRunner("dit", stage, slots=2)

    async def go():
        await runner.start()
        try:
            return await runner.run("prior", lambda: False), runner.describe()
        finally:
            await runner.stop()

    answer, described = asyncio.run(go())
    assert answer == "images"
    assert described == {"handle": "ray", "deployment": "DitStage", "retries": 0, "slots": 2, "restarts": 0}


def test_a_call_whose_replica_died_is_sent_once_more():
    from ray.exceptions import ActorDiedError

    handle = FakeHandle(ActorDiedError(), "images")
    stage = RayStage("dit", handle)
    assert stage.run("prior") == "images"
    assert handle.sent == ["prior", "prior"] and stage.describe()["retries"] == 1


def test_a_call_lost_twice_is_a_clear_stage_error():
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    stage = RayStage("dit", FakeHandle(ActorDiedError(), ActorUnavailableError("gone", None)))
    with pytest.raises(StageDied, match="a dit replica was lost while it ran this request, twice"):
        stage.run("prior")


def test_errors_raised_in_a_replica_keep_their_kind():
    from ray.exceptions import RayTaskError

    nan = RayTaskError("run", "Traceback ...", NonFiniteError("latents: NaN or Inf")).as_instanceof_cause()
    handle = FakeHandle(nan)
    with pytest.raises(NonFiniteError, match="latents: NaN or Inf") as caught:
        RayStage("dit", handle).run("prior")
    assert not isinstance(caught.value, RayTaskError) and len(handle.sent) == 1  # not retried
    broken = RayTaskError("run", "Traceback: KeyError 'x'", KeyError("x")).as_instanceof_cause()
    with pytest.raises(RuntimeError, match="the ar replica failed"):
        RayStage("ar", FakeHandle(broken)).run("call")
    # a TimeoutError raised in the replica is its error, not "no answer yet"
    late = RayTaskError("run", "Traceback ...", TimeoutError("slow disk")).as_instanceof_cause()
    with pytest.raises(RuntimeError, match="the ar replica failed"):
        RayStage("ar", FakeHandle(late)).run("call")


def test_an_abandoned_call_is_cancelled_in_its_replica():
    handle = FakeHandle("never read", delay=30)
    calls = []

    def progress(stage, done, total):
        calls.append((stage, done, total))
        if len(calls) == 3:
            raise Cancelled

    started = time.monotonic()
    with pytest.raises(Cancelled):
        RayStage("dit", handle).run("prior", progress)
    assert handle.responses[0].cancelled and calls == [("dit", 0, 0)] * 3
    assert time.monotonic() - started < 5  # stopped at the third poll, not after the call


def test_the_cluster_config_is_a_valid_serve_config_our_builder_accepts(tiny_checkpoint):
    """deploy/glm-image-ray.yaml: Serve's own schema takes it, and ``build`` makes the
    application from its args: 2 AR + 6 DiT replicas, one GPU each."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).parent.parent / "deploy" / "glm-image-ray.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == "glm_image.server.ray_app:build"
    application = build({**app["args"], "model": str(tiny_checkpoint), "output_dir": "/tmp/glm-image-yaml"})
    ingress = application._bound_deployment
    ar, dit, options = ingress.init_args
    assert ar._bound_deployment.num_replicas == 2 and dit._bound_deployment.num_replicas == 6
    for stage in (ar, dit):
        assert stage._bound_deployment.ray_actor_options["num_gpus"] == 1
    assert options["slots"] == (2, 6) and options["settings"].max_queue == 64
    assert [stage._bound_deployment.init_args[0].size for stage in (ar, dit)] == [1, 1]

    # G GPUs per replica: G ranks, one per GPU; YAML booleans reach the engine typed
    args = {**app["args"], "model": str(tiny_checkpoint), "output_dir": "/tmp/glm-image-yaml"}
    args |= {"ar_gpus": 2, "dit_gpus": 2, "dit_cache": "fbcache", "dit_cache_taylor": True}
    ar, dit, options = build(args)._bound_deployment.init_args
    specs = [stage._bound_deployment.init_args[0] for stage in (ar, dit)]
    assert (specs[0].stage, specs[0].tp, specs[1].cfg, specs[1].sp) == ("ar", 2, 2, 1)
    for stage in (ar, dit):
        assert stage._bound_deployment.ray_actor_options["num_gpus"] == 2
    assert options["decoding"][2].taylor is True
    assert options["parallel"].describe() == "AR tensor parallel x2, DiT CFG x2 (placement: same)"
    args |= {"dit_sp": 2, "dit_cache_taylor": False}
    ar, dit, options = build(args)._bound_deployment.init_args
    spec = dit._bound_deployment.init_args[0]
    assert (spec.cfg, spec.sp) == (1, 2) and options["decoding"][2].taylor is False
    # checked against the model before anything deploys: the tiny DiT has 2 heads
    with pytest.raises(GlmImageError, match="dit_sp = 4: the DiT's 2 attention heads do not split 4 ways"):
        build({**args, "dit_gpus": 4, "dit_sp": 4})
