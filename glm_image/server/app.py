"""The FastAPI app: the bigmodel and OpenAI image endpoints over one engine queue.

Thin: a body becomes a ``GenerationRequest``, the pipeline validates it (400 naming the field),
the queue runs it, and the images come back as URLs of files this server wrote or as base64.
``create_app(pipe, settings)`` takes an already-loaded ``GlmImage`` (``glm-image serve`` loads it
once before listening, so a bad ``--model`` is a one-line error, not a traceback). With an
``executor`` (``executors``: the two stages in worker processes, or as Ray Serve deployments)
``pipe`` is only the model as the API sees it (``executors.ModelFront``); the routes, errors, auth
and metrics are the same, whatever runs the engine.
"""

from __future__ import annotations

import base64
import errno
import hmac
import io
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from .._version import __version__
from ..errors import GlmImageError
from ..request import GenerationRequest, parse_size, shown
from ..sampling import MAX_SEED  # torch generators take a signed 64-bit seed
from ..validation import open_condition_image
from .errors import ApiError, error_response, style_for
from .executors import Executor, InProcessExecutor
from .files import FileStore, encode_png
from .jobs import ClientGone, EngineQueue
from .metrics import Metrics
from .schemas import BigmodelImageRequest, EditForm, OpenAIImageRequest
from .settings import ServerSettings
from .web import PAGE_PREFIX, add_web_routes, progress_id

__all__ = ["create_app"]

log = logging.getLogger("glm_image.server")

BIGMODEL_PATH = "/api/paas/v4/images/generations"
OPENAI_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
# The APIs' own defaults: the bigmodel service draws 1280x1280, OpenAI 1024x1024.
DEFAULT_SIZE = {BIGMODEL_PATH: "1280x1280", OPENAI_PATH: "1024x1024"}
SCHEMAS: dict[str, type[BaseModel]] = {
    BIGMODEL_PATH: BigmodelImageRequest,
    OPENAI_PATH: OpenAIImageRequest,
    EDITS_PATH: EditForm,
}
# Open with a key configured: liveness, and files (their 128-bit random ids are the capability,
# like the hosted service's download URLs). The API description (/docs, /openapi.json) is not:
# with a key, it needs the key too.
# The page (``web``: GET / and its static files) is open too: it asks for the key itself.
OPEN_PATHS = frozenset({"/health", "/"})
JSON_PATHS = frozenset({BIGMODEL_PATH, OPENAI_PATH})
MAX_IMAGES = 16  # condition images per edit
MAX_N = 10  # images per request (schemas: OpenAI's n)
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})  # no room left for a file (quota included)
CLIENT_GONE = 499  # nginx's "client closed request": only the log and the metrics see it
# The pipeline's own names in its messages -> the API field a client sent.
FIELD_OF = {
    "height": "size",
    "width": "size",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "num_images_per_prompt": "n",
    "images": "image",
}


class _Gate:
    """Pure ASGI middleware: bearer auth first, then one log line and one counter per request.

    Pure ASGI (not ``BaseHTTPMiddleware``) so ``receive`` reaches the endpoint untouched: the
    endpoint listens on it for the client's disconnect.
    """

    def __init__(self, app, settings: ServerSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, path, status = time.perf_counter(), scope["path"], 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            denied = self._check_key(scope)
            if denied is not None:
                await error_response(denied, style_for(path))(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.count_request(path, status)
            client = scope.get("client") or ("-", 0)
            # repr escapes control characters: a request path cannot forge log lines
            note = " (the client closed the connection)" if status == CLIENT_GONE else ""
            log.info(
                "%s %s %s %d %.3fs%s", client[0], scope["method"], repr(path)[1:-1], status, seconds, note
            )

    def _check_key(self, scope) -> ApiError | None:
        key = self.settings.api_key
        path = scope["path"]
        if key is None or path in OPEN_PATHS or path.startswith(("/files/", PAGE_PREFIX)):
            return None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if not header or scheme.lower() != b"bearer":
            return ApiError("missing_key", "missing API key: send the header 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip(), key.encode()):
            return ApiError("bad_key", "invalid API key")
        return None


def _name(text: str, limit: int = 40) -> str:
    """A client's field name as it may be echoed: UTF-8-safe (no lone surrogate) and short."""
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _validation_error(errors: list, path: str, content_type: str = "") -> ApiError:
    """Pydantic's first complaint, as a 400 naming the field (and the allowed fields or values)."""
    if path in JSON_PATHS and not _is_json(content_type):
        # FastAPI reads JSON only when the Content-Type says so; say that, not "not an object"
        sent = f"as Content-Type {shown(content_type)}" if content_type else "without a Content-Type"
        return ApiError(
            "invalid_value",
            f"body: sent {sent}; send the JSON object with 'Content-Type: application/json'",
        )
    first = errors[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = _name(".".join(where)) or "body"
    kind, more = first.get("type", ""), f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if kind == "extra_forbidden":
        allowed = ", ".join(SCHEMAS[path].model_fields) if path in SCHEMAS else "see /docs"
        return ApiError("unknown_parameter", f"{field}: unknown field; allowed: {allowed}{more}", param=field)
    if kind == "missing":
        return ApiError("missing", f"{field}: required{more}", param=field)
    if kind == "json_invalid":
        return ApiError("invalid_value", f"body: not valid JSON ({first.get('ctx', {}).get('error', '')})")
    if field == "body":
        return ApiError("invalid_value", f"body: {first.get('msg')}; expected a JSON object")
    value = shown(first.get("input"), 80)
    return ApiError("invalid_value", f"{field} = {value}: {first.get('msg')}{more}", param=field)


class _NotUtf8(ValueError):
    """A JSON body in another encoding that happens to decode as UTF-8 (UTF-16 or UTF-32 of ASCII
    text: NUL bytes, which JSON text never holds)."""


class _Utf8Request(Request):
    """JSON bodies are UTF-8 only (RFC 8259 §8.1; README). Starlette's ``json.loads(bytes)`` also
    detects UTF-16 and UTF-32, so such a body was answered 200; here it is the 400 the README
    promises. A UTF-8 byte-order mark is skipped, as before."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            nul = body.find(b"\x00")
            if nul >= 0:
                raise _NotUtf8(f"body: not UTF-8 JSON (byte 0x00 at offset {nul}: UTF-16 or UTF-32?)")
            self._json = json.loads(body.decode("utf-8").removeprefix("\ufeff"))
        return self._json


class _Utf8JsonRoute(APIRoute):
    """The app's routes, their requests read as ``_Utf8Request`` (FastAPI's documented way to
    change how a body is read)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_Utf8Request(request.scope, request.receive))

        return route


def _unreadable_body(cause: BaseException | None) -> str | None:
    """Why a JSON body could not be parsed, when FastAPI's message would not say."""
    if isinstance(cause, _NotUtf8):
        return str(cause)
    if isinstance(cause, UnicodeDecodeError):
        return f"body: not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    if isinstance(cause, RecursionError):
        return "body: JSON nested too deeply; expected a JSON object of the documented fields"
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(pipe, settings: ServerSettings | None = None, executor: Executor | None = None) -> FastAPI:
    """The app over ``pipe`` (a loaded ``GlmImage``, or anything with its request methods).

    ``executor``: what runs the engine calls; None: ``InProcessExecutor(pipe)``, one engine call
    at a time in this process. Its ``start`` runs before the server listens (a worker that
    cannot load fails the startup) and its ``stop`` when the server shuts down.
    """
    settings = settings or ServerSettings()
    # the largest request it admits, planned once: lowered (and said so) where memory cannot hold it
    admission = _admission(pipe, settings)
    metrics = Metrics()
    files = FileStore(settings.output_dir)
    executor = executor if executor is not None else InProcessExecutor(pipe)
    queue = EngineQueue(executor, settings, metrics)
    if admission is not None:  # the queue joins requests into one call only while it still fits
        queue.fits = admission.fits
    names = ["glm-image", *sorted({str(pipe.name), *settings.model_names} - {"glm-image"})]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await queue.start()
        log.info(
            "serving %s (%s): queue %d, batch %d images, timeout %gs, files in %s%s",
            pipe.name,
            executor.name,
            settings.max_queue,
            settings.max_batch,
            settings.timeout,
            files.root,
            ", bearer auth on" if settings.api_key else "",
        )
        if admission is not None and admission.lowered:
            log.warning("memory: %s", admission.lowered)
        try:
            yield
        finally:
            await queue.stop()

    app = FastAPI(title="glm-image", version=__version__, lifespan=lifespan)
    app.router.route_class = _Utf8JsonRoute  # before the routes below are added
    app.state.pipe, app.state.settings, app.state.queue = pipe, settings, queue
    app.state.executor = executor
    app.state.metrics, app.state.files = metrics, files
    app.add_middleware(_Gate, settings=settings, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> Response:
        return error_response(error, style_for(request.scope["path"]))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> Response:
        path = request.scope["path"]
        content_type = request.headers.get("content-type", "")
        return error_response(_validation_error(list(error.errors()), path, content_type), style_for(path))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, error: ClientDisconnect) -> Response:
        # the client left mid-upload: nobody reads an answer; the request's log line says so
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> Response:
        cause = error.__cause__  # what FastAPI's "There was an error parsing the body" hides
        if isinstance(cause, ClientDisconnect):
            return Response(status_code=CLIENT_GONE)
        unreadable = _unreadable_body(cause)
        if unreadable is not None:
            return error_response(ApiError("invalid_value", unreadable), style_for(request.scope["path"]))
        kind = {400: "invalid_value", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        if error.status_code not in kind:
            return JSONResponse({"error": {"message": str(error.detail)}}, status_code=error.status_code)
        message = "no such endpoint or file" if error.status_code == 404 else str(error.detail)
        return error_response(ApiError(kind[error.status_code], message), style_for(request.scope["path"]))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> Response:
        error_id = secrets.token_hex(8)
        log.error("unexpected error, error id %s", error_id, exc_info=error)
        message = f"internal error (error id {error_id})"
        return error_response(
            ApiError("internal", message, error_id=error_id), style_for(request.scope["path"])
        )

    def check_model(name: str | None) -> None:
        if name is not None and name not in names:
            allowed = ", ".join(names)
            raise ApiError(
                "model_not_found", f"model {shown(name)} does not exist; allowed: {allowed}", param="model"
            )

    def build(body, default_size: str, images: tuple = ()) -> GenerationRequest:
        """The ``GenerationRequest`` of a parsed body, validated by the pipeline."""
        size = body.size if body.size not in (None, "auto") else default_size
        try:
            width, height = parse_size(size, "size")
        except GlmImageError as e:
            raise ApiError("invalid_value", str(e), param="size") from None
        try:
            for side, value in (("width", width), ("height", height)):
                pipe.limits.check(side, value)
        except GlmImageError as e:
            raise ApiError("invalid_value", f"size = {shown(size)}: {e}", param="size") from None
        if body.seed is not None and not 0 <= body.seed <= MAX_SEED - (body.n - 1):
            raise ApiError(
                "invalid_value",
                f"seed = {shown(body.seed)}; allowed: an integer in 0..{MAX_SEED - (body.n - 1)} (image i uses seed + i)",
                param="seed",
            )
        if body.steps is not None and body.steps > settings.max_steps:
            raise ApiError(
                "invalid_value",
                f"steps = {shown(body.steps)}; allowed: 1..{settings.max_steps}",
                param="steps",
            )
        held = admission.check(height, width, body.n, len(images)) if admission is not None else None
        if held is not None:
            param = held.split(" ", 1)[0].rstrip(":")
            raise ApiError("invalid_value", held, param=param)
        lora = ()
        choice = getattr(body, "lora", None)
        if choice is not None:
            adapters = getattr(pipe, "lora_scales", {})
            if choice.name not in adapters:
                allowed = ", ".join(sorted(adapters)) or "none (start the server with --lora NAME=PATH)"
                raise ApiError(
                    "invalid_value",
                    f"lora.name = {shown(choice.name)}; allowed: {allowed}",
                    param="lora.name",
                )
            lora = ((choice.name, adapters[choice.name] if choice.scale is None else choice.scale),)
        request = GenerationRequest(
            body.prompt,
            lora=lora,
            width=width,
            height=height,
            steps=settings.steps if body.steps is None else body.steps,
            guidance=settings.guidance if body.guidance is None else body.guidance,
            seed=body.seed,
            num_images=body.n,
            images=images,
        )
        try:
            pipe.validate_request(request)
        except GlmImageError as e:
            message = str(e)
            first = message.replace("[", " ").replace("=", " ").replace(":", " ").split()[0]
            param = FIELD_OF.get(first, first)
            raise ApiError(
                "invalid_value", message if param == first else f"{param}: {message}", param=param
            ) from None
        return request

    def materialize(output, request: GenerationRequest, response_format: str, base: str) -> list[dict]:
        """PNG bytes with the parameters embedded -> files (URLs) or base64. Runs in a thread.

        All or nothing: when one file cannot be written, the ones already written for this
        request are removed (no answer will refer to them); a full disk is a 507 that says so.
        """
        items, written = [], []
        try:
            for index, (image, seed) in enumerate(zip(output.images, output.seeds, strict=True)):
                data = encode_png(image, pipe.png_info(request, output, index))
                if response_format == "b64_json":
                    items.append({"b64_json": base64.b64encode(data).decode("ascii"), "seed": seed})
                else:
                    written.append(files.write(data))
                    items.append({"url": f"{base}/files/{written[-1]}", "seed": seed})
        except BaseException as e:
            files.remove(written)
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                log.error("cannot write a generated PNG to %s: %s", files.root, e.strerror)
                raise ApiError(
                    "storage_full",
                    f"the server's disk is full ({e.strerror}): the {len(output.images)} image(s) were made "
                    "but could not be stored, and none was kept; retry later, or ask for "
                    '"response_format": "b64_json"',
                ) from None
            raise
        return items

    async def generate(http: Request, request: GenerationRequest, response_format: str | None) -> Response:
        job = queue.submit(request, progress_id(http))
        try:
            try:
                output = await queue.result(job, _disconnected(http))
            except ClientGone:
                return Response(status_code=CLIENT_GONE)
            base = (settings.public_url or str(http.base_url)).rstrip("/")
            items = await anyio.to_thread.run_sync(
                materialize, output, request, response_format or "url", base
            )
        finally:
            queue.forget(job)
        metrics.observe("total", time.perf_counter() - job.arrived)
        return JSONResponse({"created": int(time.time()), "data": items})

    @app.post(BIGMODEL_PATH, summary="bigmodel: text to image")
    async def bigmodel_generations(body: BigmodelImageRequest, http: Request) -> Response:
        check_model(body.model)
        return await generate(http, build(body, DEFAULT_SIZE[BIGMODEL_PATH]), body.response_format)

    @app.post(OPENAI_PATH, summary="OpenAI: text to image")
    async def openai_generations(body: OpenAIImageRequest, http: Request) -> Response:
        check_model(body.model)
        return await generate(http, build(body, DEFAULT_SIZE[OPENAI_PATH]), body.response_format)

    @app.post(EDITS_PATH, summary="OpenAI: image to image (multipart: image or image[], prompt, ...)")
    async def openai_edits(http: Request) -> Response:
        if not http.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                "invalid_value", "body: expected multipart/form-data with image files and a prompt"
            )
        length = http.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_IMAGES * settings.max_upload_bytes + 2**20:
            raise ApiError(
                "too_large",
                f"body: {length} bytes; allowed: {MAX_IMAGES} images of at most {settings.max_upload_bytes} bytes",
            )
        form = await http.form(max_files=MAX_IMAGES, max_fields=32)
        try:
            uploads, fields = [], {}
            for key, value in form.multi_items():
                if key in ("image", "image[]") and isinstance(value, UploadFile):
                    uploads.append(value)
                elif key == "mask":
                    raise ApiError(
                        "invalid_value", "mask: not supported; the prompt says what to change", param="mask"
                    )
                elif isinstance(value, UploadFile) or key in fields:
                    raise ApiError(
                        "invalid_value", f"{_name(key)}: expected one text value", param=_name(key)
                    )
                else:
                    fields[key] = value
            try:
                body = EditForm.model_validate(fields)
            except ValidationError as e:
                raise _validation_error(e.errors(), EDITS_PATH) from None
            check_model(body.model)
            if not uploads:
                raise ApiError("missing", "image: required; send one or more image files", param="image")
            images = []
            for i, upload in enumerate(uploads):
                data = await upload.read(settings.max_upload_bytes + 1)
                images.append(await anyio.to_thread.run_sync(read_image, data, i))
        finally:
            await form.close()
        default = f"{images[0].width}x{images[0].height}"
        return await generate(http, build(body, default, tuple(images)), body.response_format)

    def read_image(data: bytes, index: int):
        """Decode one upload (upright, 8-bit RGB), its size checked before any pixel is decoded."""
        where = f"image[{index}]"
        if len(data) > settings.max_upload_bytes:
            raise ApiError(
                "too_large", f"{where}: larger than {settings.max_upload_bytes} bytes", param="image"
            )
        try:
            return open_condition_image(io.BytesIO(data), where, pipe.limits)
        except GlmImageError as e:
            raise ApiError("invalid_value", str(e), param="image") from None

    @app.get("/health", summary="liveness; open even with an API key")
    async def health() -> Response:
        limits = pipe.limits
        broken = executor.broken
        body = {
            "status": "ok" if broken is None else "unavailable",
            "model": str(pipe.name),
            "models": names,
            "version": __version__,
            "queue_depth": queue.depth,
            "max_queue": settings.max_queue,
            "running": queue.running,
            "sizes": {"minimum": limits.minimum, "maximum": limits.maximum, "multiple": limits.multiple},
            "executor": executor.describe(),
            "lora": [
                {"name": name, "scale": scale}
                for name, scale in sorted(getattr(pipe, "lora_scales", {}).items())
            ],
        }
        if admission is not None:
            plan = pipe.memory[0]
            body["memory"] = {
                "residency": plan.residency,
                "quantize": str(plan.scheme),
                **admission.to_json(),
            }
        if broken is not None:
            body["reason"] = broken
        return JSONResponse(body, status_code=200 if broken is None else 503)

    @app.get("/metrics", summary="Prometheus text format")
    async def prometheus() -> Response:
        text = metrics.render(queue.depth, settings.max_queue, queue.running)
        if hasattr(executor, "metrics_text"):  # the executor's own series (continuous: AR occupancy)
            text += executor.metrics_text()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/files/{name}", summary="a generated PNG, by the id a generation returned")
    async def download(name: str) -> Response:
        path = files.lookup(name)
        if path is None:
            raise ApiError("not_found", "no such file")
        return FileResponse(
            path, media_type="image/png", headers={"Cache-Control": "max-age=31536000, immutable"}
        )

    add_web_routes(app)  # the page at GET /, and the progress and file listing it reads
    # HEAD answers as GET without the body (load balancers, link checkers); one schema entry each
    for route, endpoint in (("/health", health), ("/files/{name}", download)):
        app.add_api_route(route, endpoint, methods=["HEAD"], include_in_schema=False)
    return app


def _admission(pipe, settings: ServerSettings):
    """``pipe``'s admission (``admission.plan_admission``) for the largest request this server
    takes: the largest size, ``max(max_batch, MAX_N)`` images per engine call (a request of more
    than ``max_batch`` runs alone), ``MAX_IMAGES`` condition images; None when ``pipe`` was not
    placed by the planner (stage workers, several ranks)."""
    plan = getattr(pipe, "admission", None)
    if plan is None:
        return None
    return plan(pipe.limits.maximum, max(settings.max_batch, MAX_N), MAX_IMAGES)
