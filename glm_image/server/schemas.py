"""Request bodies of the two JSON endpoints.

Unknown fields are refused (400 naming the field and the allowed ones) rather than ignored, so a
client never believes a setting took effect when it did not. A few fields that hosted services
take but that mean nothing to a local engine are accepted and have no effect; they are marked.
``seed``, ``steps`` and ``guidance`` are this engine's extensions.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

__all__ = ["BigmodelImageRequest", "EditForm", "OpenAIImageRequest"]

Int = Annotated[int, Field(strict=True)]  # no "5" -> 5, no true -> 1
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Images = Annotated[int, Field(strict=True, ge=1, le=10)]  # OpenAI's n: 1..10
Format = Literal["url", "b64_json"]


class LoraChoice(BaseModel):
    """An adapter the server holds (``serve --lora NAME=PATH``), picked by name."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="an adapter name from /health's `lora` list")
    scale: Number | None = Field(
        None, description="its strength (default: the scale it was started with, or 1)"
    )


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw; at most 1000 characters. Quote the text to render.")
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, e.g. 1280x1280")
    n: Images = Field(1, description="images for this prompt (seeds count up from `seed`)")
    response_format: Format | None = Field(None, description="url (default) or b64_json")
    seed: Int | None = Field(None, description="seed of the first image (default: random)")
    steps: Int | None = Field(None, description="denoising steps (default: the server's, 50)")
    guidance: Number | None = Field(None, description="classifier-free guidance (default: the server's, 1.5)")
    lora: LoraChoice | None = Field(
        None, description="a LoRA adapter the server holds, by name, with a scale"
    )


class BigmodelImageRequest(_Common):
    """``POST /api/paas/v4/images/generations``: the bigmodel shape."""

    model: str = Field(description='"glm-image" (or the name the server was started with)')
    quality: Literal["hd", "standard"] | None = Field(None, description="accepted, no effect")
    user_id: str | None = Field(None, description="accepted, no effect")
    request_id: str | None = Field(None, description="accepted, no effect")
    watermark_enabled: bool | None = Field(None, description="accepted; this server adds no watermark")


class OpenAIImageRequest(_Common):
    """``POST /v1/images/generations``: the OpenAI Images shape."""

    model: str | None = Field(None, description='"glm-image" (or the name the server was started with)')
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(
        None, description="accepted, no effect (use steps)"
    )
    output_format: Literal["png"] | None = Field(None, description="png only")
    user: str | None = Field(None, description="accepted, no effect")


# A form's numbers are read with JSON's number grammar, so a value means on /v1/images/edits what
# it means on the JSON endpoints: ASCII digits only (no "1_0", no " 2 ", no "+2", no "٣"), no
# leading zeros, no NaN or Infinity. Python's int() and float() (pydantic's lax mode) take all of those.
_JSON_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_MAX_DIGITS = 40  # more is no seed or step count; int() of thousands of digits is slow, then refused


def _form_int(value):
    if not isinstance(value, str):
        return value
    if len(value) > _MAX_DIGITS or not _JSON_INT.fullmatch(value):
        raise PydanticCustomError(
            "form_int", "expected an integer as in JSON: ASCII digits, no spaces, '_' or '+'"
        )
    return int(value)


def _form_number(value):
    if not isinstance(value, str):
        return value
    if len(value) > _MAX_DIGITS or not _JSON_NUMBER.fullmatch(value):
        raise PydanticCustomError(
            "form_number", "expected a number as in JSON: ASCII digits, no spaces, '_', '+', NaN or Infinity"
        )
    return float(value)


FormInt = Annotated[int, BeforeValidator(_form_int), Field(strict=True)]
FormNumber = Annotated[float, BeforeValidator(_form_number), Field(strict=True, allow_inf_nan=False)]


class EditForm(BaseModel):
    """``POST /v1/images/edits``: the text fields of the multipart form (the files are ``image``
    or ``image[]``). Form values arrive as text; numbers are parsed from it by JSON's rules."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    size: str | None = None  # default: the first image's size
    n: Annotated[FormInt, Field(ge=1, le=10)] = 1
    response_format: Format | None = None
    seed: FormInt | None = None
    steps: FormInt | None = None
    guidance: FormNumber | None = None
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None  # no effect
    output_format: Literal["png"] | None = None
    user: str | None = None  # no effect
