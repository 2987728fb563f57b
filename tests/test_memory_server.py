"""The server plans for the largest request it admits, and an out-of-memory error that still
happens fails one request cleanly (the server, a block-offloaded pipeline on the tiny model,
keeps serving); the CLI says it in one line."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("fastapi", reason='the server tests need the serve extra: pip install -e ".[test,serve]"')

from glm_image.server.app import create_app
from glm_image.server.runner import ServerThread
from glm_image.server.settings import ServerSettings

OPENAI = "/v1/images/generations"


def _post(url: str, body: dict):
    import requests

    return requests.post(url + OPENAI, json=body, timeout=120)


def test_an_out_of_memory_error_fails_one_request_and_frees_what_it_held(tiny_checkpoint, tmp_path):
    from glm_image import GlmImage

    pipe = GlmImage.from_pretrained(tiny_checkpoint, residency="dit_offload")
    stream = pipe.streams["dit"]
    block = pipe.dit.model.transformer_blocks[0]
    raised = []

    def out_of_memory(module, args):  # after the stream's hook: block 0 (and 1) are on the "device"
        if not raised:
            raised.append(len(stream._loaded))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = block.register_forward_pre_hook(out_of_memory)
    try:
        with ServerThread(create_app(pipe, ServerSettings(output_dir=tmp_path, steps=1))) as url:
            r = _post(url, {"prompt": "p", "size": "64x64"})
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert re.fullmatch(r"[0-9a-f]{16}", error["error_id"]) and error["error_id"] in error["message"]
            assert "ran out of memory" in error["message"] and "keeps serving" in error["message"]
            # the copies in flight when it failed are dropped: the blocks rest in host memory
            assert raised == [2] and not stream._loaded
            assert all(
                t.data_ptr() == h.data_ptr()
                for u in stream.units
                for t, h in zip(u.slots, u.host, strict=True)
            )
            r = _post(url, {"prompt": "p", "size": "64x64"})
            assert r.status_code == 200 and len(r.json()["data"]) == 1
    finally:
        hook.remove()
        pipe.close()


def test_the_server_admits_what_its_memory_holds(tiny_checkpoint, tmp_path):
    """A budget that holds a 64x64 image but not 1024x1024: the server says so at startup and in
    /health, answers a request it cannot hold with a 400 naming the limit, and serves the rest."""
    from glm_image import GlmImage
    from glm_image.residency import estimate_memory

    budget = estimate_memory(tiny_checkpoint, "none", torch.float32, height=128, width=128).peak("resident")
    pipe = GlmImage.from_pretrained(tiny_checkpoint, max_memory=budget)
    app = create_app(pipe, ServerSettings(output_dir=tmp_path, steps=1, max_batch=4))
    admission = app.state.queue.fits.__self__
    assert 128 <= admission.max_side < 1024 and admission.lowered
    assert not admission.fits(128, 128, 4) or admission.batch >= 4
    import requests

    with ServerThread(app) as url:
        health = requests.get(url + "/health", timeout=10).json()["memory"]
        assert health["max_size"] == f"{admission.max_side}x{admission.max_side}"
        assert health["budget_bytes"] == budget and "1024x1024" in health["lowered"]
        r = _post(url, {"prompt": "p", "size": "1024x1024"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "size" and "size = 1024x1024" in error["message"]
        assert f"allowed: at most {admission.max_side}x{admission.max_side}" in error["message"]
        r = _post(url, {"prompt": "p", "size": "64x64"})
        assert r.status_code == 200


def test_the_cli_says_out_of_memory_in_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from glm_image.cli import main
    from glm_image.models.dit import DitModel

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DitModel, "forward", out_of_memory)
    code = main(
        [
            "generate",
            "--model",
            str(tiny_checkpoint),
            "p",
            "--size",
            "64x64",
            "--steps",
            "1",
            "-o",
            str(tmp_path / "x.png"),
        ]
    )
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("glm-image:")]  # (progress bars aside)
    assert code == 1 and len(said) == 1 and "ran out of memory" in said[0] and "Traceback" not in err
