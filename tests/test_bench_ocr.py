"""The OCR scorer reads text we render ourselves, offline, with the models its wheel ships."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from glm_image.bench.metrics import cvtg_score, longtext_score
from glm_image.bench.ocr import RapidOcr  # imports rapidocr only when an instance is made

pytest.importorskip("rapidocr")
pytest.importorskip("onnxruntime")


def _font(size: int):
    found = (
        sorted(Path("/usr/share/fonts").rglob("DejaVuSans-Bold.ttf"))
        if Path("/usr/share/fonts").is_dir()
        else []
    )
    return ImageFont.truetype(str(found[0]), size) if found else ImageFont.load_default(size=size)


@pytest.fixture
def offline(monkeypatch):
    """Any network connection during the test is an error."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_reads_rendered_words_offline(offline):
    image = Image.new("RGB", (640, 256), "white")
    draw = ImageDraw.Draw(image)
    draw.text((24, 30), "GRAND OPENING", fill="black", font=_font(48))
    draw.text((24, 140), "Summer Sale 2025", fill=(20, 40, 120), font=_font(44))
    ocr = RapidOcr()
    lines = ocr.read(image)
    assert cvtg_score(["Grand Opening", "Summer Sale 2025"], lines).word_accuracy == 1.0, lines
    assert longtext_score(["GRAND OPENING", "Summer Sale 2025"], " ".join(lines), "en").text_score == 1.0
    assert ocr.read(Image.new("RGB", (128, 128), "white")) == []
    info = ocr.describe()
    assert info["package"].startswith("rapidocr ") and "PaddleOCR" in info["note"]
    import rapidocr

    models = Path(rapidocr.__file__).parent / "models"
    assert all((models / name).is_file() for name in info["models"].values())  # the wheel's own files
