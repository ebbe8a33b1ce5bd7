"""A line-fed Server-Sent Events decoder: data payloads out, comments and other fields ignored."""

from __future__ import annotations

DONE = "[DONE]"


class SseDecoder:
    """Turns the lines of an SSE stream into the data payload of each event.

    Follows the SSE rules that matter for completion streams: `data:` lines (with or without one
    space after the colon) of one event are joined by newlines and the event is dispatched at the
    blank line that ends it; lines starting with ':' are comments (keep-alives); `event:`, `id:`
    and `retry:` fields are ignored.
    """

    def __init__(self) -> None:
        self._data_lines: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line (without its line ending); return a payload when an event completes."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if not colon:
            name, value = line, ""
        if name != "data":
            return None
        self._data_lines.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """Dispatch an event that the stream ended without a blank line after."""
        return self._dispatch()

    def _dispatch(self) -> str | None:
        if not self._data_lines:
            return None
        payload = "\n".join(self._data_lines)
        self._data_lines.clear()
        return payload
