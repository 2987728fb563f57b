"""`glm-image serve`'s input handling (issue 30): a busy port before the model loads, a forced
shutdown answering 503, a full disk answering 507 with nothing half-written left, and the edits
form and JSON bodies read by the same rules as the JSON endpoints. The tiny model, 64 pixels a
side, one denoising step."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytest.importorskip("fastapi", reason='the server tests need the serve extra: pip install -e ".[test,serve]"')

from test_server import BIGMODEL, EDITS, OPENAI, GatedPipe, depth_is, noise_png, post, serving, wait_until

from glm_image.cli import main
from glm_image.server.app import create_app
from glm_image.server.settings import ServerSettings


@pytest.fixture(scope="module")
def server(glm, tmp_path_factory):
    with serving(glm, tmp_path_factory.mktemp("inputs") / "files") as running:
        yield running


def one_line(err: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------- 1: busy port


@pytest.mark.parametrize("ray", [False, True])
def test_a_busy_port_is_one_line_before_the_model_loads(ray, tmp_path, monkeypatch, capsys):
    import glm_image.pipeline
    import glm_image.server.executors

    def never(*args, **kwargs):
        raise AssertionError("the model loaded although the port was busy")

    monkeypatch.setattr(glm_image.pipeline.GlmImage, "from_pretrained", never)
    monkeypatch.setattr(glm_image.server.executors.ModelFront, "from_checkpoint", never)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = ["serve", "--port", str(port), "--output-dir", str(tmp_path / "files")]
        assert main([*argv, "--ray"] if ray else argv) == 2
    err = capsys.readouterr().err
    one_line(err)
    assert f"--host 127.0.0.1 --port {port}: the port is already in use" in err


def test_a_host_that_is_not_here_is_one_line(tmp_path, capsys):
    argv = ["serve", "--output-dir", str(tmp_path / "files"), "--port", "0"]
    assert main([*argv, "--host", "192.0.2.1"]) == 2  # TEST-NET-1: never this machine's address
    err = capsys.readouterr().err
    one_line(err)
    assert "--host 192.0.2.1: not an address of this machine" in err
    assert main([*argv, "--host", "no-such-host.invalid"]) == 2
    err = capsys.readouterr().err
    one_line(err)
    assert "--host no-such-host.invalid: cannot listen there" in err


def test_the_port_is_held_while_the_model_loads_and_clients_are_refused_not_hung(tmp_path):
    """`listen` binds before the model loads; until uvicorn listens, a client (a health probe)
    is refused at once rather than left waiting."""
    from glm_image.server.cli import listen

    sockets = listen("127.0.0.1", 0)
    try:
        port = sockets[0].getsockname()[1]
        with socket.socket() as other, pytest.raises(OSError) as error:
            other.bind(("127.0.0.1", port))
        assert error.value.errno == errno.EADDRINUSE
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        for sock in sockets:
            sock.close()


# ---------------------------------------------------------------------------------------- 2: forced shutdown


def test_a_second_ctrl_c_answers_every_waiting_request_503(glm, tmp_path, caplog):
    """The first Ctrl-C waits for the requests in flight; the second ("force quit") must answer
    them, running and queued, with a 503 in their endpoint's error shape, and log no traceback."""
    from glm_image.server.cli import listen, uvicorn_server

    gated = GatedPipe(glm)
    app = create_app(gated, ServerSettings(output_dir=tmp_path / "files", steps=1))
    sockets = listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    server = uvicorn_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    caplog.set_level(logging.INFO)
    thread.start()
    wait_until(lambda: server.started)
    body = {"model": "glm-image", "prompt": "p", "size": "64x64"}
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, url, OPENAI, body)
        assert gated.entered.wait(10)
        queued = [pool.submit(post, url, OPENAI, {**body, "size": "96x64"})]
        wait_until(depth_is(app, 1))
        queued.append(pool.submit(post, url, BIGMODEL, {**body, "size": "64x96"}))
        wait_until(depth_is(app, 2))
        server.handle_exit(signal.SIGINT, None)  # what uvicorn's signal handler does, twice
        time.sleep(0.3)
        server.handle_exit(signal.SIGINT, None)
        answers = [running.result(timeout=30), *(f.result(timeout=30) for f in queued)]
        gated.gate.set()  # the engine, released, finds its call abandoned
    thread.join(timeout=30)
    assert not thread.is_alive()
    for r in answers[:2]:
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "service_unavailable" and error["type"] == "server_error"
        assert "the server is shutting down" in error["message"]
    r = answers[2]
    assert r.status_code == 503 and r.json()["error"]["code"] == "503"
    assert "shutting down" in r.json()["error"]["message"]
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text
    assert not any(record.exc_info for record in caplog.records)


# ---------------------------------------------------------------------------------------- 3: full disk


@pytest.mark.parametrize("path", [OPENAI, BIGMODEL])
def test_a_full_disk_is_507_and_keeps_no_file_of_the_request(glm, tmp_path, monkeypatch, path):
    out = tmp_path / "files"
    with serving(glm, out) as (url, app):
        store, write, calls = app.state.files, app.state.files.write, []

        def fails_second(data: bytes) -> str:  # the first PNG is written, the second finds no room
            calls.append(1)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(data)

        monkeypatch.setattr(store, "write", fails_second)
        r = post(url, path, {"model": "glm-image", "prompt": "p", "size": "64x64", "n": 3})
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert "disk is full" in error["message"] and "none was kept" in error["message"]
        if path == OPENAI:
            assert (error["type"], error["code"]) == ("server_error", "insufficient_storage")
        else:
            assert set(error) == {"code", "message"} and error["code"] == "507"
        assert len(calls) == 2
        assert [p.name for p in out.iterdir() if not p.name.startswith(".probe")] == []
        monkeypatch.setattr(store, "write", write)  # room again: the server goes on
        r = post(url, path, {"model": "glm-image", "prompt": "p", "size": "64x64", "n": 2})
        assert r.status_code == 200 and len(list(out.glob("*.png"))) == 2


def test_another_write_error_is_a_500_and_also_keeps_no_file(glm, tmp_path, monkeypatch):
    out = tmp_path / "files"
    with serving(glm, out) as (url, app):
        store, write, calls = app.state.files, app.state.files.write, []

        def fails_second(data: bytes) -> str:
            calls.append(1)
            if len(calls) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return write(data)

        monkeypatch.setattr(store, "write", fails_second)
        r = post(url, OPENAI, {"prompt": "p", "size": "64x64", "n": 2})
        assert r.status_code == 500 and "error id" in r.json()["error"]["message"]
        assert list(out.glob("*.png")) == []


# ---------------------------------------------------------------------------------------- 4: form and JSON


def edit_form(**fields) -> list:
    form = [(key, (None, value)) for key, value in fields.items()]
    return [*form, ("image", ("0.png", noise_png(64, 64)))]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", "1_0"),
        ("seed", " 1"),
        ("seed", "+1"),
        ("seed", "01"),
        ("seed", "1.0"),
        ("seed", "\u0663"),  # ARABIC-INDIC DIGIT THREE: int() reads it as 3
        ("seed", "9" * 5000),
        ("steps", " 2 "),
        ("steps", "2\n"),
        ("n", "1_0"),
        ("n", " 1"),
        ("guidance", "1_5"),
        ("guidance", " 1.5"),
        ("guidance", "nan"),
        ("guidance", "Infinity"),
        ("guidance", "1.5e0 "),
    ],
)
def test_edit_form_numbers_follow_the_json_rules(server, field, value):
    url, _ = server
    r = requests.post(url + EDITS, files=edit_form(prompt="p", **{field: value}), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field} = "), error
    assert "as in JSON" in error["message"] and len(error["message"]) < 300


def test_edit_form_numbers_in_json_form_are_read(server):
    url, _ = server
    form = edit_form(prompt="p", seed="10", steps="1", n="2", guidance="1.5e0", response_format="b64_json")
    r = requests.post(url + EDITS, files=form, timeout=60)
    assert r.status_code == 200, r.text
    assert [item["seed"] for item in r.json()["data"]] == [10, 11]
    r = requests.post(url + EDITS, files=edit_form(prompt="p", seed="-1"), timeout=60)
    assert r.status_code == 400 and "seed = -1; allowed: an integer in 0.." in r.json()["error"]["message"]


BODY = {"model": "glm-image", "prompt": "p", "size": "64x64", "response_format": "b64_json"}


@pytest.mark.parametrize("path", [OPENAI, BIGMODEL])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_a_json_body_not_in_utf8_is_400(server, path, encoding):
    url, _ = server
    data = json.dumps(BODY).encode(encoding)
    r = requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("body: not UTF-8") and "byte 0x" in message and "offset" in message


@pytest.mark.parametrize("path", [OPENAI, BIGMODEL])
def test_a_utf8_json_body_with_or_without_a_bom_is_read(server, path):
    url, _ = server
    for data in (json.dumps(BODY).encode(), b"\xef\xbb\xbf" + json.dumps(BODY).encode()):
        r = requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text
    data = json.dumps({**BODY, "prompt": "\u00e9t\u00e9"}, ensure_ascii=False).encode("latin-1")
    r = requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "not UTF-8 text (byte 0xe9" in r.json()["error"]["message"]
