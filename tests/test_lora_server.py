"""The server holds adapters by name (``serve --lora NAME=PATH``); a request picks one with a scale
on both APIs and gets the image the pipeline makes with that adapter; /health lists them."""

from __future__ import annotations

import base64
import contextlib
import io

import numpy as np
import pytest
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
