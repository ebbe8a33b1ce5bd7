"""Server-Sent Events: formatting, keep-alive comments, a response that stops on disconnect.

The event generators send `KEEPALIVE` themselves whenever their request group has been silent
for the keep-alive interval (`RequestGroup.with_idle`), so no task is created per event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.disconnect import cancel_on_disconnect
from service.api.errors import ClientDisconnectedError, to_api_error

if TYPE_CHECKING:
    from service.engine.async_engine import RequestGroup

logger = logging.getLogger(__name__)


def error_event(exc: Exception, request_id: str | None) -> str:
    """The `data: {"error": ...}` event that ends a stream which failed after it started."""
    err = to_api_error(exc, request_id)
    if err.status == 500:
        logger.error("stream %s failed: %r", request_id, exc)
    return format_event(err.body())


DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def format_event(payload: Any) -> str:
    """One `data:` event; JSON escapes newlines, so the payload stays on one line."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response with keep-alives; a disconnect cancels the event source.

    Cancelling the source at once (rather than at the next failed send) is what aborts a
    request that is still waiting in the queue.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], group: RequestGroup | None = None) -> None:
        super().__init__(events, headers=SSE_HEADERS)
        self.group = group  # closed however the response ends, even if it never started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(cancel_on_disconnect(receive, self.stream_response(send)))
        stalled = False

        def on_stalled() -> None:
            # A reader that stopped reading for too long: its work is aborted; stop waiting on
            # its socket too, so the response ends unfinished and the connection closes.
            nonlocal stalled
            stalled = True
            streaming.cancel()

        if self.group is not None:
            self.group.stalled_callbacks.append(on_stalled)
        try:
            await streaming
        except (ClientDisconnectedError, OSError):
            pass  # the client is gone: nothing to send, the work is already cancelled
        except asyncio.CancelledError:
            if not stalled:
                raise
        finally:
            body = self.body_iterator
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.group is not None:
                self.group.close()
