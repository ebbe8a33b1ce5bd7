"""The one place that maps exceptions to HTTP status codes and the error body.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}` (the
`ErrorResponse` model, which `/openapi.json` documents too), whether it came from request
validation, the engine, the middleware or a bug. Messages say what to do: a body sent without
`Content-Type: application/json` is refused with 415 and says so (it is not guessed to be JSON:
a cross-site page may send text/plain without a CORS preflight); a field of the other API
(`max_tokens` on /generate) names the right one; the chat API, which this server does not
serve, points to `/v1/completions`.
"""

from __future__ import annotations

import logging
from email.message import Message
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.sampling_params import SamplingParamsError
from service.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)

logger = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_SECONDS = 1
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    """What went wrong: a message for people, and `type`, `param`, `code` for programs."""

    model_config = ConfigDict(extra="forbid")

    message: str
    type: str  # OpenAI-style, from the status: invalid_request_error, rate_limit_error, ...
    param: str | None  # the request field at fault, if one is
    code: str  # a stable name for the error, such as prompt_too_long or queue_full


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class APIError(Exception):
    """An error with its HTTP status and the fields of the error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        """The error's type name (OpenAI-style), derived from the status."""
        return _STATUS_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


class BodyTooLargeError(Exception):
    """The request body is larger than the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit} bytes")
        self.limit = limit


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready; its engine work was aborted."""


def invalid_request(message: str, param: str | None) -> APIError:
    """A 400 for a field the client got wrong."""
    return APIError(400, message, code="invalid_value", param=param)


def to_api_error(
    exc: BaseException,
    request_id: str | None = None,
    retry_after: int = DEFAULT_RETRY_AFTER_SECONDS,
) -> APIError:
    """Map any exception to the APIError sent for it; unknown ones become a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), code="prompt_too_long", param=exc.param or "prompt")
    if isinstance(exc, InvalidRequestError):
        return invalid_request(str(exc), exc.param)
    if isinstance(exc, SamplingParamsError):
        return invalid_request(str(exc), exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(retry_after)})
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, str(exc), code="not_ready")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    if isinstance(exc, BodyTooLargeError):
        return APIError(413, str(exc), code="body_too_large")
    if isinstance(exc, ClientDisconnectedError):  # nginx's 499: nobody reads it, the log does
        return APIError(499, "the client closed the request", code="client_disconnected")
    # Anything else is a bug or an engine step failure: say which request, not the internals.
    kind = "the engine failed" if isinstance(exc, EngineError) else "internal server error"
    return APIError(500, f"{kind} (request id {request_id})", code="internal_error")


def error_response(err: APIError) -> JSONResponse:
    """The JSON response for an APIError."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


# Pydantic names the union member that failed in `loc` ("prompt", "list[int]", 0): not a field.
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "function-after", "function-before"}


def _param_from_loc(loc: list[str | int]) -> str | None:
    """The field path of a validation error, e.g. `stream_options.include_usage`."""
    parts = [str(part) for part in loc if part != "body"]
    kept = parts[:1] + [
        part for part in parts[1:] if "[" not in part and part.lower() not in _TYPE_TAGS
    ]
    return ".".join(kept) or None


# Fields that belong to the other API (or to another route), and what to send instead.
_USE_MAX_NEW_TOKENS = "use 'max_new_tokens' (max_tokens is the /v1/completions name)"
_USE_MAX_TOKENS = "use 'max_tokens' (max_new_tokens is the /generate name)"
_FIELD_HINTS: dict[tuple[str, str], str] = {
    ("/generate", "max_tokens"): _USE_MAX_NEW_TOKENS,
    ("/stream", "max_tokens"): _USE_MAX_NEW_TOKENS,
    ("/generate", "stream"): "for a streamed answer, POST the same body to /stream",
    ("/v1/completions", "max_new_tokens"): _USE_MAX_TOKENS,
    ("/v1/completions", "messages"): "this server serves the completions API for base models: "
    "send a 'prompt'",
}
# Routes of other APIs that clients try, and where to go instead.
_ROUTE_HINTS: dict[str, str] = {
    "/v1/chat/completions": "this server serves the OpenAI completions API for base (non-chat) "
    "GPT-2 models, with no chat template: POST a 'prompt' to /v1/completions instead",
}


def is_json_content_type(value: str | None) -> bool:
    """application/json, or any application/*+json."""
    if not value:
        return False
    header = Message()
    header["content-type"] = value
    subtype = header.get_content_subtype()
    return header.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _unsupported_content_type(content_type: str | None) -> APIError:
    """415 for a body sent without a JSON content type."""
    given = f"has Content-Type '{content_type}'" if content_type else "has no Content-Type"
    return APIError(
        415,
        "the request body must be JSON sent with 'Content-Type: application/json' (this "
        f"request {given}); with curl, add -H 'Content-Type: application/json'",
        code="unsupported_media_type",
    )


def _validation_error(exc: RequestValidationError, path: str, content_type: str | None) -> APIError:
    """A 400 naming the first field that failed validation (415 for a non-JSON body)."""
    errors = exc.errors()
    if not errors:
        return invalid_request("the request body is invalid", None)
    first = errors[0]
    loc = list(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "malformed JSON")
        return invalid_request(f"the request body is not valid JSON: {detail}", None)
    param = _param_from_loc(loc)
    if kind == "missing" and param is None:  # no body at all
        return invalid_request("a JSON object body is required", None)
    if kind == "missing":
        return invalid_request(f"'{param}' is required", param)
    if kind == "extra_forbidden":
        hint = _FIELD_HINTS.get((path, str(param)))
        message = f"'{param}' is not a supported field of {path}" + (f": {hint}" if hint else "")
        return APIError(400, message, code="unknown_field", param=param)
    if param is None and not is_json_content_type(content_type):
        return _unsupported_content_type(content_type)
    if param is None:
        return invalid_request("the request body must be a JSON object", None)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return invalid_request(f"invalid '{param}': {message}", param)


def _http_error(request: Request, exc: StarletteHTTPException) -> APIError:
    """404 and 405 from routing, with the route and method named."""
    route = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        hint = _ROUTE_HINTS.get(request.url.path)
        message = f"{route} is not served: {hint}" if hint else f"no route {route}; see /docs"
        return APIError(404, message, code="not_found")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{route}: method not allowed" + (f"; use {allowed}" if allowed else "")
        return APIError(405, message, code="method_not_allowed")
    return APIError(exc.status_code, str(exc.detail), code="http_error")


def install_error_handlers(app: FastAPI, retry_after: int = DEFAULT_RETRY_AFTER_SECONDS) -> None:
    """Register the handlers that give every error the same shape."""

    async def handle_validation(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, RequestValidationError):  # pragma: no cover - registration
            raise exc
        content_type = request.headers.get("content-type")
        return error_response(_validation_error(exc, request.url.path, content_type))

    async def handle_http(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registration
            raise exc
        err = _http_error(request, exc)
        err.headers = dict(exc.headers or {})
        return error_response(err)

    async def handle_known(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc, _request_id(request), retry_after)
        if err.status == 500:
            logger.error("request %s failed: %r", _request_id(request), exc)
        return error_response(err)

    app.add_exception_handler(RequestValidationError, handle_validation)
    app.add_exception_handler(StarletteHTTPException, handle_http)
    known = (APIError, EngineError, SamplingParamsError, BodyTooLargeError, ClientDisconnectedError)
    for exc_class in known:
        app.add_exception_handler(exc_class, handle_known)
