"""OCR for the quality benchmark: RapidOCR on onnxruntime, with the models its wheel ships.

RapidOCR 3.x puts its default PP-OCR ONNX models (text detection, angle classification,
recognition: Chinese + English and more) inside the wheel. We hand it those files by path, so it
never reaches for its download code: scoring works offline, and a wheel without the files is a
clear error, not a download. rapidocr is imported here only, when a quality run starts (the
``eval`` extra).

This is not the OCR the published numbers used: CVTG-2K was scored with PaddleOCR and
LongText-Bench with Qwen2.5-VL-7B reading the image. Our numbers compare engines and checkpoints
with each other; they are not comparable with published tables.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from ..errors import GlmImageError

__all__ = ["PUBLISHED_OCR_NOTE", "RapidOcr"]

PUBLISHED_OCR_NOTE = (
    "published CVTG-2K numbers used PaddleOCR and published LongText-Bench numbers used Qwen2.5-VL-7B as the "
    "reader; scores from this OCR are comparable with each other, not with published tables"
)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


class RapidOcr:
    """``RapidOcr().read(image)`` -> the recognised text lines, top to bottom."""

    def __init__(self) -> None:
        try:
            import rapidocr
            from rapidocr import RapidOCR
        except ImportError:
            raise GlmImageError(
                "bench quality needs an OCR package: pip install 'glm-image[eval]' (rapidocr and onnxruntime)"
            ) from None
        models = Path(rapidocr.__file__).parent / "models"
        paths = {}
        for task in ("det", "cls", "rec"):
            found = sorted(models.glob(f"*{task}*.onnx"))
            if not found:
                raise GlmImageError(
                    f"rapidocr {_version('rapidocr')} has no {task} model in {models}; we do not download "
                    "OCR models: install a rapidocr release that ships them (pip install 'glm-image[eval]')"
                )
            paths[task] = found[-1]
        self.models = {task: path.name for task, path in paths.items()}
        params = {
            "Global.log_level": "error",
            "Det.model_path": str(paths["det"]),
            "Cls.model_path": str(paths["cls"]),
            "Rec.model_path": str(paths["rec"]),
        }
        self._engine = RapidOCR(params=params)

    @property
    def name(self) -> str:
        return f"RapidOCR {_version('rapidocr')} ({self.models['det']}, {self.models['rec']})"

    def describe(self) -> dict:
        return {
            "package": f"rapidocr {_version('rapidocr')}",
            "runtime": f"onnxruntime {_version('onnxruntime')}",
            "models": self.models,
            "note": PUBLISHED_OCR_NOTE,
        }

    def read(self, image) -> list[str]:
        """The text lines in a PIL image (empty when none is found)."""
        out = self._engine(image.convert("RGB"))
        return [str(text) for text in (out.txts or ())]
