"""Connection limits uvicorn does not have: a header timeout, and a cap answered in our shape.

A client that opens a connection and sends half a request line would otherwise hold it (and a
file descriptor) forever: uvicorn times out idle keep-alive connections, but not a request whose
headers never finish. Here every request must deliver its request line and headers within
`header_timeout` seconds of the connection opening, or of its first byte for each later request
on a kept-alive connection; if not,
the server answers 408 and closes. Connections beyond `max_connections` are answered 503 with
the usual JSON error body as soon as their request arrives, and closed: they never reach the app.
(Closing one before reading what the client sent would reset it, and the client would see a
connection error instead of the 503.)
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


def _error_bytes(status: int, reason: str, message: str, code: str) -> bytes:
    kind = "invalid_request_error" if status == 408 else "service_unavailable"
    body = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        indent=None,
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout and a connection cap."""

    header_timeout: float = 10.0
    max_connections: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._refusal: bytes | None = None  # the 503 an over-the-cap connection gets

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.max_connections
        if limit is not None and len(self.connections) > limit:
            message = (
                f"the server has its maximum of {limit} open connections; retry later or "
                "reuse a connection"
            )
            self._refusal = _error_bytes(
                503, "Service Unavailable", message, "too_many_connections"
            )
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._refusal is None:
            super().data_received(data)
        elif not self.transport.is_closing():
            self._cancel_header_timer()
            self.transport.write(self._refusal)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's clock starts with its first byte (on_message_begin); uvicorn's
        # keep-alive timeout closes a connection on which no further request starts.
        self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        logger.info(
            "closing a connection from %s: no complete request headers within %.0f s",
            "{}:{}".format(*self.client) if self.client else "?",
            self.header_timeout,
        )
        message = f"the request line and headers did not arrive within {self.header_timeout:g} s"
        self.transport.write(_error_bytes(408, "Request Timeout", message, "header_timeout"))
        self.transport.close()


def limited_protocol(header_timeout: float, max_connections: int | None) -> type:
    """The protocol class for uvicorn's `http=` with these limits."""
    return type(
        "ConfiguredHttpProtocol",
        (LimitedHttpProtocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
