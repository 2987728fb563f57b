"""`glm-image serve` against a hostile but legitimate client (issue 13): the real server on a
loopback port, the tiny model, 64..96 pixels a side, one denoising step.

A request that breaks the engine fails alone; special-token strings in a prompt are text; bad
values are 400s that echo little and name the field; images arrive upright and in full range.
"""

from __future__ import annotations

import logging
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from PIL import Image

from glm_image.request import GenerationRequest

pytest.importorskip("fastapi", reason='the server tests need the serve extra: pip install -e ".[test,serve]"')

from test_robustness import eight_bit_of, exif_rotated, noise, png_bytes, sixteen_bit_grey
from test_server import (
    BIGMODEL,
    EDITS,
    OPENAI,
    GatedPipe,
    b64_image,
    depth_is,
    metrics,
    post,
    same_pixels,
    serving,
    wait_until,
)


@pytest.fixture(scope="module")
def server(glm, tmp_path_factory):
    with serving(glm, tmp_path_factory.mktemp("hostile") / "files") as running:
        yield running


def edit(url: str, images: list[bytes], **fields) -> requests.Response:
    form = [(key, (None, str(value))) for key, value in fields.items()]
    form += [("image[]", (f"{i}.png", data)) for i, data in enumerate(images)]
    return requests.post(url + EDITS, files=form, timeout=60)


def queue_behind_a_held_engine(gated: GatedPipe, url: str, app, pool, bodies: list[dict]) -> list:
    """Hold the engine with one request, queue ``bodies`` behind it, then let it run: the queued
    requests (same size, steps, guidance) share one engine call."""
    holder = pool.submit(post, url, OPENAI, {"prompt": "hold", "size": "64x64"})
    assert gated.entered.wait(10)
    futures = []
    for body in bodies:
        futures.append(pool.submit(post, url, OPENAI, body))
        wait_until(depth_is(app, len(futures)))
    gated.gate.set()
    assert holder.result().status_code == 200
    return [future.result() for future in futures]


# ---------------------------------------------------------------------------------------- 1: one bad prompt


def test_a_poisoned_batch_gives_the_valid_requests_their_images(glm, tmp_path):
    """Special-token strings in one prompt of a batch: every request of the batch succeeds."""
    gated = GatedPipe(glm)
    body = {"size": "64x64", "response_format": "b64_json"}
    bad = "a sign <|image|> that says <|dit_token_16385|> 'OPEN'"
    bodies = [{**body, "prompt": bad, "seed": 1}]
    bodies += [{**body, "prompt": prompt, "seed": seed} for prompt, seed in (("a", 11), ("b", 12), ("c", 13))]
    with serving(gated, tmp_path) as (url, app), ThreadPoolExecutor(5) as pool:
        responses = queue_behind_a_held_engine(gated, url, app, pool, bodies)
    assert gated.calls == [["hold"], [bad, "a", "b", "c"]]  # one engine call for the four
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    images = [b64_image(r.json()["data"][0]) for r in responses]
    assert [r.json()["data"][0]["seed"] for r in responses] == [1, 11, 12, 13]
    assert all(len(r.json()["data"]) == 1 for r in responses)
    assert not any(same_pixels(x, y) for i, x in enumerate(images) for y in images[i + 1 :])
    alone = glm.run(GenerationRequest("b", 64, 64, steps=1, seed=12)).images[0]
    assert same_pixels(images[2], alone)


def test_an_engine_fault_in_a_batch_fails_only_its_request(glm, tmp_path, monkeypatch):
    """One request makes the DiT return NaN: it alone gets a 500; the batch's others run again
    alone and get their images; the counters say what happened."""
    denoise = glm.dit.denoise

    def nan_for_poison(prior, prompts, *args, **kwargs):
        latents = denoise(prior, prompts, *args, **kwargs)
        per = latents.shape[0] // len(prompts)
        poisoned = torch.tensor(["poison" in p for p in prompts]).repeat_interleave(per)
        return torch.where(poisoned[:, None, None, None], float("nan"), latents)

    monkeypatch.setattr(glm.dit, "denoise", nan_for_poison)
    gated = GatedPipe(glm)
    body = {"size": "64x64", "response_format": "b64_json"}
    prompts = ("poison", "a", "b", "c")
    bodies = [{**body, "prompt": prompt, "seed": 20 + i} for i, prompt in enumerate(prompts)]
    with serving(gated, tmp_path) as (url, app), ThreadPoolExecutor(5) as pool:
        poisoned, *valid = queue_behind_a_held_engine(gated, url, app, pool, bodies)
        values = metrics(url)
    assert gated.calls == [["hold"], list(prompts), ["poison"], ["a"], ["b"], ["c"]]
    assert poisoned.status_code == 500, poisoned.text
    error = poisoned.json()["error"]
    assert re.fullmatch(r"[0-9a-f]{16}", error["error_id"]) and "NaN or Inf" in error["message"]
    assert [r.status_code for r in valid] == [200] * 3, [r.text for r in valid]
    assert [[item["seed"] for item in r.json()["data"]] for r in valid] == [[21], [22], [23]]
    alone = glm.run(GenerationRequest("c", 64, 64, steps=1, seed=23)).images[0]
    assert same_pixels(b64_image(valid[2].json()["data"][0]), alone)
    assert values["glm_image_images_generated_total"] == 4  # "hold" and the three
    assert values["glm_image_engine_calls_total"] == 6 and values["glm_image_engine_failures_total"] == 2
    assert values["glm_image_engine_batches_split_total"] == 1
    assert values['glm_image_requests_total{endpoint="/v1/images/generations",status="500"}'] == 1


@pytest.mark.parametrize("path", [BIGMODEL, OPENAI])
def test_a_lone_surrogate_is_400_naming_the_prompt(server, path):
    url, _ = server
    r = post(url, path, {"model": "glm-image", "prompt": "a\ud800b", "size": "64x64"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("prompt: not valid Unicode text (a lone surrogate")


def test_special_token_strings_in_an_edit_prompt_are_text(server):
    url, _ = server
    r = edit(url, [png_bytes(noise(64, 64))], prompt="make <|image|> red", seed=2, response_format="b64_json")
    assert r.status_code == 200, r.text
    assert b64_image(r.json()["data"][0]).size == (64, 64)


# ---------------------------------------------------------------------------------------- 2: guidance


@pytest.mark.parametrize("guidance", [1e30, 20.5, 0.99])
def test_guidance_outside_1_to_20_is_400(server, guidance):
    url, _ = server
    r = post(url, OPENAI, {"prompt": "p", "size": "64x64", "guidance": guidance})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance"
    assert "allowed: a number in 1..20" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------- 5: echoes and noise


def test_long_values_are_not_echoed_back(server):
    url, _ = server
    for body, status in (
        ({"prompt": "p", "size": "1" * 1_000_000}, 400),
        ({"prompt": "p", "size": "64x64", "model": "m" * 1_000_000}, 404),
        ({"prompt": "p", "size": "64x64", "k" * 1_000_000: 1}, 400),
    ):
        r = post(url, OPENAI, body)
        assert r.status_code == status and len(r.content) < 600, r.text[:600]
        assert "characters)" in r.text or "..." in r.text


def test_messages_are_single_and_meaningful(server):
    url, _ = server
    message = post(url, OPENAI, {"prompt": "p", "size": "big"}).json()["error"]["message"]
    assert message == "size = 'big': expected WIDTHxHEIGHT in ASCII digits, e.g. 1024x1024"
    r = edit(url, [b"GIF89a, or so it says"], prompt="p")
    assert r.status_code == 400 and " at 0x" not in r.text and "object" not in r.text
    assert (
        r.json()["error"]["message"]
        == "image[0]: not a readable image (not a format Pillow can read, e.g. PNG, JPEG, WebP)"
    )
    latin1 = requests.post(
        url + OPENAI, data=b'{"prompt": "caf\xe9"}', headers={"Content-Type": "application/json"}, timeout=30
    )
    assert latin1.status_code == 400
    assert latin1.json()["error"]["message"] == "body: not UTF-8 text (byte 0xe9 at offset 15)"
    plain = requests.post(
        url + OPENAI, data='{"prompt": "p"}', headers={"Content-Type": "text/plain"}, timeout=30
    )
    assert plain.status_code == 400
    assert plain.json()["error"]["message"] == (
        "body: sent as Content-Type 'text/plain'; send the JSON object with 'Content-Type: application/json'"
    )


def test_a_client_that_drops_mid_upload_is_one_info_line(server, caplog):
    url, _ = server
    before = metrics(url)
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST {EDITS} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        'Content-Length: 100000\r\n\r\n--B\r\nContent-Disposition: form-data; name="image"; '
        'filename="a.png"\r\n\r\n'
    )
    with caplog.at_level(logging.INFO), socket.create_connection((host, int(port))) as client:
        client.sendall(head.encode() + b"\x89PNG" * 100)  # 400 of the 100000 bytes it announced
        client.close()
        key = 'glm_image_requests_total{endpoint="/v1/images/edits",status="499"}'
        wait_until(lambda: metrics(url).get(key, 0) == before.get(key, 0) + 1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    lines = [r.getMessage() for r in caplog.records if EDITS in r.getMessage()]
    assert len(lines) == 1 and "499" in lines[0] and "the client closed the connection" in lines[0]


# ---------------------------------------------------------------------------------------- 6: sizes


@pytest.mark.parametrize("size", ["２５６x256", "2_56x256", "+64x+64", "64 x 64"])
def test_sizes_other_than_ascii_width_x_height_are_400(server, size):
    url, _ = server
    r = post(url, BIGMODEL, {"model": "glm-image", "prompt": "p", "size": size})
    assert r.status_code == 400 and "expected WIDTHxHEIGHT in ASCII digits" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------- 7: images, HEAD, docs


def test_an_edit_sees_the_photo_upright(server):
    """EXIF orientation 6: the engine gets the picture as a viewer shows it (and its size)."""
    url, _ = server
    upright = noise(64, 96, seed=4)
    turned = edit(url, [exif_rotated(upright)], prompt="p", seed=5, response_format="b64_json")
    plain = edit(url, [png_bytes(upright)], prompt="p", seed=5, response_format="b64_json")
    assert turned.status_code == 200 and plain.status_code == 200, (turned.text, plain.text)
    a, b = (b64_image(r.json()["data"][0]) for r in (turned, plain))
    assert a.size == (64, 96) and same_pixels(a, b)


def test_an_edit_reads_16_bit_grey_over_its_whole_range(server):
    url, _ = server
    values = sixteen_bit_grey()
    deep = edit(url, [png_bytes(Image.fromarray(values))], prompt="p", seed=6, response_format="b64_json")
    reference = Image.fromarray(eight_bit_of(values)).convert("RGB")
    flat = edit(url, [png_bytes(reference)], prompt="p", seed=6, response_format="b64_json")
    assert deep.status_code == 200 and flat.status_code == 200, (deep.text, flat.text)
    assert same_pixels(b64_image(deep.json()["data"][0]), b64_image(flat.json()["data"][0]))


def test_head_works_as_get_without_a_body(server):
    url, app = server
    data = png_bytes(noise(64, 64))
    name = app.state.files.write(data)
    for path, length in (("/health", None), (f"/files/{name}", len(data))):
        get, head = requests.get(url + path, timeout=10), requests.head(url + path, timeout=10)
        assert head.status_code == get.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        if length is not None:
            assert int(head.headers["content-length"]) == length == len(get.content)
    assert requests.head(url + "/files/" + "0" * 32 + ".png", timeout=10).status_code == 404


def test_the_api_description_needs_the_key_when_one_is_set(glm, tmp_path):
    with serving(glm, tmp_path, api_key="s3cret") as (url, _):
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert requests.get(url + path, timeout=10).status_code == 401
            with_key = requests.get(url + path, headers={"Authorization": "Bearer s3cret"}, timeout=10)
            assert with_key.status_code == 200
        assert requests.head(url + "/health", timeout=10).status_code == 200
