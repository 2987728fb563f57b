"""Continuous batching with LoRA adapters chosen per request: each request's rows apply its own
adapters (held on the engine when the request is planned, as a static call holds them) and run
apart beside the pooled rows, so a request's tokens and image equal its solo run with the same
adapters, bit for bit on a CPU in float32; requests without adapters beside them keep theirs.

The oracles: ``ArEngine.generate`` inside ``lora.applied`` (the static AR stage's call) and
``GlmImage.run`` with the request's ``lora``. Adapters are made by PEFT on the tiny checkpoint
with random A and B (``lora_helpers``), so they change the tokens; the test checks they do.
"""

from __future__ import annotations

import base64
import contextlib
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from lora_helpers import peft_ar, peft_dit
from PIL import Image

from glm_image import GlmImage
from glm_image.engine import ArEngine
from glm_image.engine.scheduler import ArScheduler
from glm_image.errors import GlmImageError
from glm_image.lora import StageLora, applied
from glm_image.request import GenerationRequest

SHORT = ("a red circle", 64, 64)
LONG = ("一张海报，标题写着「春节快乐」", 96, 64)
FEW = {"max_new_tokens": 20}


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    """Two adapters, ``a`` (AR and DiT) and ``b`` (AR only): name -> folder."""
    root = tmp_path_factory.mktemp("continuous-lora")
    peft_ar(tiny_checkpoint, root / "a" / "vision_language_encoder", seed=1)
    peft_dit(tiny_checkpoint, root / "a" / "transformer", seed=2, lora_alpha=8)
    peft_ar(tiny_checkpoint, root / "b" / "vision_language_encoder", seed=3)
    return {"a": str(root / "a"), "b": str(root / "b")}


def _lora(adapters, selection) -> StageLora:
    rows = selection if isinstance(selection, list) else [selection]
    names = sorted({name for row in rows for name, _ in row})
    return StageLora(tuple((name, adapters[name]) for name in names), selection)


def test_rows_with_their_own_adapters_get_their_solo_tokens(tiny_checkpoint, adapters):
    engine = ArEngine.from_pretrained(tiny_checkpoint)  # its own: the adapters' hooks stay on it
    scheduler = ArScheduler(engine, max_rows=6)
    a, b = (("a", 0.8),), (("b", 1.0), ("a", 0.5))
    cases = [  # (args, options, lora): plain rows pooled beside rows with adapters
        (LONG, {"seeds": 11}, _lora(adapters, a)),
        (SHORT, {"seeds": 5, **FEW}, None),
        (SHORT, {"seeds": 3, "num_images_per_prompt": 2, **FEW}, _lora(adapters, [b, ()])),
        (SHORT, {"seeds": 7, "decoding": "jacobi", "jacobi_window": 4, **FEW}, _lora(adapters, b)),
        (LONG, {"seeds": 12, **FEW}, None),
    ]
    tickets = [scheduler.submit(*case[0], lora=case[2], **case[1]) for case in cases[:2]]
    for _ in range(5):  # the others join mid-decode
        scheduler.step()
    tickets += [scheduler.submit(*case[0], lora=case[2], **case[1]) for case in cases[2:]]
    scheduler.run_until_idle()
    assert scheduler.mode == "invariant"  # the plain rows were pooled
    for ticket, (args, options, lora) in zip(tickets, cases, strict=True):
        with applied(engine, "ar", lora):
            solo = engine.generate(*args, **options)
        assert torch.equal(ticket.wait().tokens, solo.tokens), (args, options, lora)
        if lora is not None:  # not a trivial pass: the adapters change the tokens
            plain = engine.generate(*args, **options)
            assert not torch.equal(plain.tokens, solo.tokens)
    # the two images of one request: each its own selection (the second row takes none)
    two = tickets[2].wait().tokens
    assert torch.equal(two[1], engine.generate(*SHORT, seeds=3, num_images_per_prompt=2, **FEW).tokens[1])


def test_a_selection_that_does_not_cover_the_images_is_refused(tiny_ar, adapters):
    scheduler = ArScheduler(tiny_ar, max_rows=2)
    lora = _lora(adapters, [(("a", 1.0),)] * 3)
    with pytest.raises(GlmImageError, match="a selection for 3 images; the request has 2"):
        scheduler.submit(*SHORT, num_images_per_prompt=2, lora=lora)
    with pytest.raises(GlmImageError, match=r"lora = 'a'; allowed: a glm_image\.lora\.StageLora or None"):
        scheduler.submit(*SHORT, lora="a")
    assert scheduler.idle


def _pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def test_the_continuous_server_applies_each_requests_adapter(tiny_checkpoint, adapters, tmp_path):
    pytest.importorskip(
        "fastapi", reason='the server tests need the serve extra: pip install -e ".[test,serve]"'
    )
    import requests

    from glm_image.server.app import create_app
    from glm_image.server.continuous import ContinuousExecutor, executor_for
    from glm_image.server.runner import ServerThread
    from glm_image.server.settings import ServerSettings

    pipe = GlmImage.from_pretrained(tiny_checkpoint, device="cpu")
    pipe.load_lora("a", adapters["a"])
    pipe.lora_scales = {"a": 1.0}  # what `serve --lora a=PATH` sets
    assert isinstance(executor_for(pipe, "auto"), ContinuousExecutor)  # adapters no longer rule it out
    bodies = [
        {"prompt": "a red circle", "size": "64x64", "seed": 5, "lora": {"name": "a", "scale": 0.8}},
        {"prompt": "two blue 'SIGNS'", "size": "96x64", "seed": 7, "n": 2},
        {"prompt": "春节快乐", "size": "64x64", "seed": 9, "lora": {"name": "a"}},
    ]
    settings = ServerSettings(output_dir=tmp_path, steps=2)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(
            ServerThread(create_app(pipe, settings, ContinuousExecutor(pipe, max_rows=3)))
        )
        pool = stack.enter_context(ThreadPoolExecutor(len(bodies)))
        answers = list(
            pool.map(
                lambda body: requests.post(
                    url + "/v1/images/generations", json={**body, "response_format": "b64_json"}, timeout=300
                ),
                bodies,
            )
        )
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status_code == 200, answer.text
        width, height = map(int, body["size"].split("x"))
        chosen = body.get("lora")
        lora = ((chosen["name"], chosen.get("scale", 1.0)),) if chosen else ()
        request = GenerationRequest(
            body["prompt"], width, height, steps=2, seed=body["seed"], num_images=body.get("n", 1), lora=lora
        )
        solo = pipe.run(request).images
        got = [_pixels(item) for item in answer.json()["data"]]
        assert len(got) == len(solo)
        for image, alone in zip(got, solo, strict=True):
            assert np.array_equal(image, np.asarray(alone.convert("RGB")))
        if lora:  # the adapter changed the image
            plain = pipe.run(GenerationRequest(body["prompt"], width, height, steps=2, seed=body["seed"]))
            assert np.abs(got[0].astype(int) - np.asarray(plain.images[0].convert("RGB"))).max() > 10
