"""Per-request plumbing: request id, body-size limit, access log, and the last-resort 500.

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, so streamed responses pass
through untouched and the disconnect of a client still reaches the route. The probe routes
(`/health`, `/ready`, `/metrics`), which load balancers and Prometheus poll every few seconds,
are logged at DEBUG so they do not bury the requests at INFO.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import BodyTooLargeError, error_response, to_api_error

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("gptserve.access")

REQUEST_ID_HEADER = "x-request-id"
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})  # access-logged at DEBUG
# Ids from clients end up in logs and headers: accept only short, plain ones.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-Id when it is a plain token, else a new one."""
    given = _header(scope, REQUEST_ID_HEADER.encode())
    if given is not None and _VALID_REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


async def read_body(scope: Scope, receive: Receive, limit: int) -> Receive:
    """Read the whole body (refusing more than `limit` bytes); returns a receive that replays it."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # disconnected while sending the body
            replay: list[Message] = [message]
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            break

    async def replaying_receive() -> Message:
        # After the body, the real channel: it yields http.disconnect when the client leaves.
        return replay.pop(0) if replay else await receive()

    return replaying_receive


class RequestContextMiddleware:
    """Gives each request an id, enforces the body limit, logs it, and answers 500 for bugs."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            body_receive = await read_body(scope, receive, self.max_body_bytes)
            await self.app(scope, body_receive, send_with_id)
        except Exception as exc:
            err = to_api_error(exc, request_id)
            if err.status == 500:
                logger.exception("request %s failed", request_id)
            if status is None:  # nothing sent yet: answer with the error, as the routes do
                await error_response(err)(scope, receive, send_with_id)
        finally:
            self._log_access(scope, state, request_id, status, started)

    @staticmethod
    def _log_access(
        scope: Scope, state: dict[str, Any], request_id: str, status: int | None, started: float
    ) -> None:
        latency_ms = (time.perf_counter() - started) * 1000
        usage = state.get("usage") or {}
        level = logging.DEBUG if scope.get("path") in PROBE_PATHS else logging.INFO
        access_logger.log(
            level,
            "%s %s %s %s %.1fms prompt_tokens=%s completion_tokens=%s request_id=%s",
            scope.get("client", ("-",))[0] if scope.get("client") else "-",
            scope.get("method", "-"),
            scope.get("path", "-"),
            status if status is not None else "-",
            latency_ms,
            usage.get("prompt_tokens", "-"),
            usage.get("completion_tokens", "-"),
            request_id,
            extra={
                "request_id": request_id,
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status,
                "latency_ms": round(latency_ms, 2),
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
            },
        )


def record_usage(state: Any, prompt_tokens: int, completion_tokens: int) -> None:
    """Note a request's token counts (on `request.state`) for its access-log line."""
    state.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
