"""API errors, rendered in the style of the endpoint that raised them.

bigmodel (``/api/paas/v4/...``): ``{"error": {"code": "1214", "message": "..."}}`` with the
service's business codes (1001/1002 auth, 1211 unknown model, 1213/1214 bad field, 1302 too busy,
500 internal). OpenAI (everything else): ``{"error": {"message", "type", "param", "code"}}``.
The HTTP status is the same in both; a 500 also carries ``error_id`` (and the same id in the
log line of its traceback), so a user can quote it without the server showing internals.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

__all__ = ["ApiError", "error_response", "style_for"]

# kind -> (HTTP status, bigmodel code, OpenAI type, OpenAI code)
_KINDS = {
    "invalid_value": (400, "1214", "invalid_request_error", "invalid_value"),
    "missing": (400, "1213", "invalid_request_error", "missing_required_parameter"),
    "unknown_parameter": (400, "1214", "invalid_request_error", "unknown_parameter"),
    "missing_key": (401, "1001", "invalid_request_error", "invalid_api_key"),
    "bad_key": (401, "1002", "invalid_request_error", "invalid_api_key"),
    "model_not_found": (404, "1211", "invalid_request_error", "model_not_found"),
    "not_found": (404, "1222", "invalid_request_error", "not_found"),
    "method_not_allowed": (405, "1222", "invalid_request_error", "method_not_allowed"),
    "too_large": (413, "1214", "invalid_request_error", "request_too_large"),
    "queue_full": (429, "1302", "requests", "rate_limit_exceeded"),
    "internal": (500, "500", "server_error", "internal_error"),
    # The bigmodel service documents no code for these; the HTTP status is used as the code.
    "unavailable": (503, "503", "server_error", "service_unavailable"),
    "timeout": (504, "504", "server_error", "timeout"),
    "storage_full": (507, "507", "server_error", "insufficient_storage"),
}


class ApiError(Exception):
    """An error a request gets as a JSON body; ``param`` is the API field it is about."""

    def __init__(
        self, kind: str, message: str, *, param: str | None = None, error_id: str | None = None
    ) -> None:
        super().__init__(message)
        if kind not in _KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        self.kind, self.message, self.param, self.error_id = kind, message, param, error_id

    @property
    def status(self) -> int:
        return _KINDS[self.kind][0]


def style_for(path: str) -> str:
    """The bigmodel style under its API prefix, the OpenAI style everywhere else."""
    return "bigmodel" if path.startswith("/api/paas/") else "openai"


def error_response(error: ApiError, style: str) -> JSONResponse:
    status, big_code, openai_type, openai_code = _KINDS[error.kind]
    if style == "bigmodel":
        body: dict = {"code": big_code, "message": error.message}
    else:
        body = {"message": error.message, "type": openai_type, "param": error.param, "code": openai_code}
    headers = {}
    if error.error_id is not None:
        body["error_id"] = error.error_id
        headers["X-Error-Id"] = error.error_id
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 429:
        headers["Retry-After"] = "1"
    return JSONResponse({"error": body}, status_code=status, headers=headers)
