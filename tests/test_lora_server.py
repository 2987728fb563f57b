"""The server holds adapters by name (``serve --lora NAME=PATH``); a request picks one with a scale
on both APIs and gets the image the pipeline makes with that adapter; /health lists them."""

from __future__ import annotations

import base64
import contextlib
import io

import numpy as np
import pytest
import torch
from lora_helpers import peft_ar, peft_dit
from PIL import Image

from glm_image import GlmImage
from glm_image.request import GenerationRequest

for _module in ("fastapi", "uvicorn"):
    pytest.importorskip(
        _module, reason='the server tests need the serve extra: pip install -e ".[test,serve]"'
    )
requests = pytest.importorskip("requests")

from glm_image.server.app import create_app  # noqa: E402
from glm_image.server.runner import ServerThread  # noqa: E402
from glm_image.server.settings import ServerSettings  # noqa: E402

BIGMODEL = "/api/paas/v4/images/generations"
OPENAI = "/v1/images/generations"


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    peft_ar(tiny_checkpoint, root / "style" / "vision_language_encoder")
    peft_dit(tiny_checkpoint, root / "style" / "transformer", lora_alpha=8)
    pipe = GlmImage.from_pretrained(tiny_checkpoint, device="cpu")
    pipe.load_lora("style", root / "style")
    pipe.lora_scales = {"style": 1.0}  # what `serve --lora style=PATH` sets
    app = create_app(pipe, ServerSettings(output_dir=root / "files", steps=1))
    with contextlib.ExitStack() as stack:
        yield stack.enter_context(ServerThread(app)), pipe


def _image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def test_a_request_gets_the_adapter_it_names(served):
    url, pipe = served
    body = {"prompt": "p", "size": "64x64", "seed": 3, "response_format": "b64_json"}
    chosen = {**body, "lora": {"name": "style", "scale": 0.8}}
    oai = _image(requests.post(url + OPENAI, json=chosen, timeout=120))
    big = _image(requests.post(url + BIGMODEL, json={**chosen, "model": "glm-image"}, timeout=120))
    plain = _image(requests.post(url + OPENAI, json=body, timeout=120))
    expected = pipe.run(GenerationRequest("p", 64, 64, steps=1, seed=3, lora=(("style", 0.8),))).images[0]
    assert np.array_equal(oai, np.asarray(expected)) and np.array_equal(big, oai)
    assert np.abs(oai.astype(int) - plain).max() > 10, "the adapter must change the image"
    default = _image(requests.post(url + OPENAI, json={**body, "lora": {"name": "style"}}, timeout=120))
    alone = pipe.run(GenerationRequest("p", 64, 64, steps=1, seed=3, lora=(("style", 1.0),))).images[0]
    assert np.array_equal(default, np.asarray(alone))


def test_health_lists_the_adapters_and_an_unknown_name_is_400(served):
    url, _ = served
    assert requests.get(url + "/health", timeout=10).json()["lora"] == [{"name": "style", "scale": 1.0}]
    r = requests.post(
        url + OPENAI, json={"prompt": "p", "size": "64x64", "lora": {"name": "nope"}}, timeout=30
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "lora.name" and "allowed: style" in error["message"], error
    r = requests.post(url + OPENAI, json={"prompt": "p", "lora": {"name": "style", "scale": "x"}}, timeout=30)
    assert r.status_code == 400 and "lora" in r.text


def test_stages_on_threads_apply_each_requests_adapter(served, tmp_path):
    """``serve --placement separate`` runs the stages on threads of their own
    (``StagedExecutor.in_threads``): requests batched together, one with the adapter and one
    without, each get the image the pipeline makes for it alone."""
    from concurrent.futures import ThreadPoolExecutor

    from glm_image.server.executors import StagedExecutor

    _, pipe = served
    executor = StagedExecutor.in_threads(pipe)
    assert executor.mixes_adapters  # no step cache: requests with different adapters share a call
    app = create_app(pipe, ServerSettings(output_dir=tmp_path, steps=1, max_batch=4), executor)
    bodies = [
        {"prompt": "p", "size": "64x64", "seed": 5, "response_format": "b64_json", "lora": {"name": "style"}},
        {"prompt": "q", "size": "64x64", "seed": 6, "response_format": "b64_json"},
    ]
    with ServerThread(app) as url, ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda b: _image(requests.post(url + OPENAI, json=b, timeout=120)), bodies))
    expected = [
        pipe.run(GenerationRequest("p", 64, 64, steps=1, seed=5, lora=(("style", 1.0),))).images[0],
        pipe.run(GenerationRequest("q", 64, 64, steps=1, seed=6)).images[0],
    ]
    for ours, theirs in zip(got, expected, strict=True):
        assert np.array_equal(ours, np.asarray(theirs))


def test_stage_workers_apply_the_adapter_a_request_names_and_a_new_worker_too(
    served, tiny_checkpoint, tmp_path
):
    """``serve --stages separate --lora style=PATH``: the adapter is checked on both workers
    before the first request and applied to the requests that name it; a worker that died and
    was replaced reads it at its first call (the call carries its source). A bad adapter stops
    the server at start, naming the module."""
    import os
    import signal
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    from test_server_stages import alive, command, free_port, serve_command, wait_until, worker_pids

    _, pipe = served
    style = pipe.lora.sources["style"]
    port = free_port()
    body = {
        "prompt": "p",
        "size": "64x64",
        "seed": 3,
        "response_format": "b64_json",
        "lora": {"name": "style"},
    }
    expected = np.asarray(
        pipe.run(GenerationRequest("p", 64, 64, steps=1, seed=3, lora=(("style", 1.0),))).images[0]
    )
    with serve_command(command(tiny_checkpoint, port, tmp_path, "--lora", f"style={style}"), port) as (
        _,
        url,
    ):
        assert requests.get(url + "/health", timeout=10).json()["lora"] == [{"name": "style", "scale": 1.0}]
        assert np.array_equal(_image(requests.post(url + OPENAI, json=body, timeout=120)), expected)
        pids = list(worker_pids(url).values())
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # idle: found dead and replaced at the next call
        wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10)
        for _ in pids:  # a worker seen alive as a call was sent fails that call, named; once each
            r = requests.post(url + OPENAI, json=body, timeout=180)
            if r.status_code != 500:
                break
            assert "SIGKILL" in r.json()["error"]["message"], r.text
        else:
            r = requests.post(url + OPENAI, json=body, timeout=180)
        assert np.array_equal(_image(r), expected)  # the new workers read the adapter at this call
        assert requests.get(url + "/health", timeout=10).json()["executor"]["ar"]["restarts"] == 1

    broken = tmp_path / "broken"
    (broken / "transformer").mkdir(parents=True)
    source = Path(style) / "transformer"
    (broken / "transformer" / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("to_q.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    save_file(tensors, broken / "transformer" / "adapter_model.safetensors")
    import subprocess

    done = subprocess.run(
        command(tiny_checkpoint, free_port(), tmp_path, "--lora", f"bad={broken}"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode != 0 and "to_q" in done.stderr + done.stdout, done.stderr[-2000:]
