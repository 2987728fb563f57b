"""The page at ``GET /``, and the three small endpoints it reads besides the image APIs.

The page (``page/``: index.html, app.js, style.css; no build step, nothing fetched from
outside this server) generates through the same endpoints as any client (``POST
/v1/images/generations``, ``/v1/images/edits``) and shows their answers and error messages as
they are. It adds no second generation path; it reads:

- ``GET /v1/progress/{id}``: where a request sent with the header ``X-Progress-Id: <id>`` is:
  queued (``ahead``: jobs before it), running with each stage's ``done`` / ``total`` (AR tokens,
  then DiT steps: the numbers of the command line's progress bars), or finishing (its files are
  being written), or ``unknown``: not arrived yet, or already answered (a 200, so polling a
  request about to start is no error). Polled, not server-sent events: a browser's
  ``EventSource`` cannot send the ``Authorization`` header.
- ``GET /v1/files?limit=N``: this server's recent results (newest first) from its output folder.
- ``GET /v1/web/config``: what a request may ask of this server (sizes, steps, guidance, the
  prompt limit) and the decoding and caching options it was started with (fixed per server).

A request is cancelled by closing its connection (the page aborts its fetch): the queue drops
it, or stops its engine call at the next step, as for any client that goes away.

The page and its files are open; everything it reads needs the API key when one is set.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from ..validation import MAX_GUIDANCE, MAX_PROMPT_CHARS, MIN_GUIDANCE
from .errors import ApiError

__all__ = ["PAGE_PREFIX", "PROGRESS_HEADER", "RECOMMENDED_SIZES", "add_web_routes", "progress_id"]

PAGE_PREFIX = "/web/"  # the page's static files; open, like the page itself
PROGRESS_HEADER = "X-Progress-Id"
# A client's own random id: long enough not to collide, short enough to log; no path characters.
PROGRESS_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
# The model card's recommended sizes (WIDTHxHEIGHT; DESIGN.md section 2), offered as presets.
RECOMMENDED_SIZES = ("1280x1280", "1568x1056", "1056x1568", "1472x1088", "1088x1472", "1728x960", "960x1728")
MAX_LISTED = 100
# The page's files, each with its type; no other name is served.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Nothing from anywhere but this server (blob: is the condition image chosen on this machine, data: the empty icon), no
# inline script or style: the page works offline, and no text shown on it can run as code.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def progress_id(http: Request) -> str | None:
    """The request's ``X-Progress-Id``, checked; None when it has none."""
    value = http.headers.get(PROGRESS_HEADER)
    if value is None:
        return None
    if not PROGRESS_ID.fullmatch(value):
        raise ApiError(
            "invalid_value",
            f"{PROGRESS_HEADER}: allowed: 16..64 characters of A-Z, a-z, 0-9, '-' and '_' (a random id)",
            param=PROGRESS_HEADER,
        )
    return value


def _page_file(name: str) -> bytes:
    return (resources.files(__package__) / "page" / name).read_bytes()


def _options(pipe) -> dict:
    """The engine options the server was started with (``serve --ar-decoding`` ...): they hold for
    every request, so the page shows them rather than offering them."""
    cache = getattr(pipe, "dit_cache", None)
    return {
        "ar_decoding": getattr(pipe, "ar_decoding", "sequential"),
        "jacobi_window": getattr(pipe, "jacobi_window", None),
        "dit_cache": None if cache is None else dataclasses.asdict(cache),
        "quantize": getattr(pipe, "quantize", "none"),
    }


def add_web_routes(app: FastAPI) -> None:
    """The page and its endpoints, on ``create_app``'s app (its state: pipe, settings, queue, files)."""
    pipe, settings = app.state.pipe, app.state.settings
    queue, files = app.state.queue, app.state.files

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(_page_file("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get(PAGE_PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            raise ApiError("not_found", "no such file")
        return Response(_page_file(name), media_type=ASSETS[name], headers=HEADERS)

    @app.get("/v1/web/config", summary="what a request may ask of this server, for the page")
    async def config() -> Response:
        limits = pipe.limits
        return JSONResponse(
            {
                "model": str(pipe.name),
                "prompt_max_chars": MAX_PROMPT_CHARS,
                "sizes": {
                    "minimum": limits.minimum,
                    "maximum": limits.maximum,
                    "multiple": limits.multiple,
                    "recommended": list(RECOMMENDED_SIZES),
                },
                "steps": {"default": settings.steps, "maximum": settings.max_steps},
                "guidance": {"default": settings.guidance, "minimum": MIN_GUIDANCE, "maximum": MAX_GUIDANCE},
                "max_upload_bytes": settings.max_upload_bytes,
                "engine": _options(pipe),
            }
        )

    @app.get("/v1/progress/{tag}", summary=f"progress of the request sent with {PROGRESS_HEADER}")
    async def progress(tag: str) -> Response:
        if not PROGRESS_ID.fullmatch(tag):
            raise ApiError(
                "invalid_value",
                f"id: not a {PROGRESS_HEADER} (16..64 of A-Z, a-z, 0-9, '-', '_')",
                param="id",
            )
        answer = queue.progress(tag) or {"id": tag, "state": "unknown", "stages": {}}
        return JSONResponse(answer, headers={"Cache-Control": "no-store"})

    @app.get("/v1/files", summary="this server's recent results, newest first")
    async def listing(http: Request, limit: str = "24") -> Response:
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= MAX_LISTED):
            raise ApiError(
                "invalid_value",
                f"limit = {limit[:20]!r}; allowed: an integer in 1..{MAX_LISTED}",
                param="limit",
            )
        base = (settings.public_url or str(http.base_url)).rstrip("/")
        data = [
            {"name": name, "url": f"{base}/files/{name}", "created": int(mtime), "bytes": size}
            for name, mtime, size in await anyio.to_thread.run_sync(files.recent, int(limit))
        ]
        return JSONResponse({"data": data}, headers={"Cache-Control": "no-store"})
