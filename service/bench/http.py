"""A lean HTTP/1.1 client for the load generator: keep-alive connections, streamed bodies.

The benchmark's client usually shares the machine with the server it measures, so every
microsecond it spends per streamed event is taken from the server. Measured on a 2-core machine
against gptserve at 32 int8 streams (~800 events/s): httpx's streamed responses cost ~210 us of
client CPU per event (3.6-3.8 s over a 24 s round) and the server made 765-788 tok/s; reading the
same streams here costs ~27 us per event and the server made 863-869, what its engine does
without HTTP. Every server in a comparison is driven through this same client.

Only what a completions benchmark needs: GET and POST over http or https, responses framed by
`Transfer-Encoding: chunked`, `Content-Length` or the end of the connection, no proxies, no
redirects, no compression. A connection goes back to the pool only after its response was read
to the end and the server did not ask to close it; a kept connection that the server has
closed meanwhile is dropped before it is used.

Some servers close a connection right after a streamed response although its headers offered to
keep it (llama.cpp's llama-server does, after every stream), and the close can arrive just after
the next request went out on it. So a request whose kept connection closes before one byte of an
answer comes back is sent once more, on a new connection, as browsers do: the server may have
read it, but a completions request changes nothing on the server, so at worst it computes one
answer twice. A request is never sent again after a failure on a new connection, or once any of
its answer has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024


class HttpError(Exception):
    """A request could not be sent or its response could not be read."""


class ConnectError(HttpError):
    """The server could not be reached."""


class ProtocolError(HttpError):
    """The server's response is not HTTP/1.x as this client reads it."""


class _ClosedUnanswered(ProtocolError):
    """The connection closed before any byte of a response."""


class Response:
    """Status, headers (names lower-cased) and the body of one response, read as it arrives."""

    def __init__(
        self, reader: asyncio.StreamReader, status: int, headers: dict[str, str], keep_alive: bool
    ) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._keep_alive = keep_alive
        self.is_complete = False  # the whole body has been read

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry another request."""
        return self.is_complete and self._keep_alive

    async def iter_lines(self) -> AsyncIterator[str]:
        """The body's lines as they complete (see split_lines), and a last one without a line
        ending."""
        pending = bytearray()
        async for chunk in self.iter_chunks():
            for line in split_lines(pending, chunk):
                yield line
        for line in rest_of_lines(pending):
            yield line

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked framing removed)."""
        reader = self._reader
        encoding = self.headers.get("transfer-encoding", "").lower()
        try:
            if self.status in (204, 304):  # no body, whatever the headers say
                pass
            elif "chunked" in encoding:
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    try:
                        size = int(size_line.split(b";", 1)[0], 16)
                    except ValueError:
                        raise ProtocolError(f"bad chunk size line {size_line[:40]!r}") from None
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                            pass
                        break
                    data = await reader.readexactly(size + 2)
                    if data[-2:] != b"\r\n":
                        raise ProtocolError("chunk not followed by CRLF")
                    yield data[:-2]
            elif "content-length" in self.headers:
                length = self.headers["content-length"]
                if not length.isdigit():
                    raise ProtocolError(f"bad Content-Length {length[:40]!r}")
                remaining = int(length)
                while remaining > 0:
                    data = await reader.read(min(remaining, 65536))
                    if not data:
                        raise ProtocolError("connection closed before the body's end")
                    remaining -= len(data)
                    yield data
            else:  # the body ends with the connection
                self._keep_alive = False
                while data := await reader.read(65536):
                    yield data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            raise ProtocolError(f"connection closed or garbled mid-body: {error}") from None
        self.is_complete = True

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.iter_chunks()])


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class ConnectionPool:
    """Keep-alive connections to any number of origins; one request per connection at a time."""

    def __init__(
        self, connect_timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl = ssl_context  # for https; the system's trusted certificates when None
        self._closed = False

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> AsyncIterator[Response]:
        """Send a request; yields its response with the body not yet read. Leaving the block
        returns the connection to the pool if the body was read to its end, else closes it."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpError(f"not an http(s) URL: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as error:
            raise HttpError(f"bad port in {url!r}: {error}") from None
        key = (parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        connection = self._take_idle(key)
        response: Response | None = None
        try:
            if connection is None:
                connection = await self._connect(key)
                response = await self._send(connection, head + body)
            else:
                try:
                    response = await self._send(connection, head + body)
                except (_ClosedUnanswered, ConnectionResetError, BrokenPipeError):
                    connection.close()  # closed by the server, maybe before it read the request
                    connection = None
                    connection = await self._connect(key)
                    response = await self._send(connection, head + body)
            yield response
        except OSError as error:
            raise HttpError(f"{type(error).__name__}: {error}") from None
        finally:
            if connection is not None:
                if response is not None and response.reusable and not self._closed:
                    self._idle.setdefault(key, []).append(connection)
                else:
                    connection.close()

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        """A kept connection to `key` that the server has not closed meanwhile, if any."""
        idle = self._idle.get(key, [])
        while idle:
            connection = idle.pop()
            if not (connection.reader.at_eof() or connection.writer.is_closing()):
                return connection
            connection.close()
        return None

    async def _send(self, connection: _Connection, data: bytes) -> Response:
        connection.writer.write(data)
        await connection.writer.drain()
        return await self._read_head(connection.reader)

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        context: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, limit=MAX_HEADER_BYTES),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as error:
            raise ConnectError(str(error) or type(error).__name__) from None
        return _Connection(reader, writer)

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> Response:
        interim = False  # an interim (1xx) response came first
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except ConnectionResetError:  # reset: the same as closed, with or without bytes
                if interim:
                    raise ProtocolError("connection reset after an interim response") from None
                raise _ClosedUnanswered("connection reset before a response") from None
            except asyncio.IncompleteReadError as error:
                if error.partial:
                    raise ProtocolError("connection closed in a response's headers") from None
                if interim:
                    raise ProtocolError("connection closed after an interim response") from None
                raise _ClosedUnanswered("connection closed before a response") from None
            except asyncio.LimitOverrunError:
                raise ProtocolError("response headers too large") from None
            status_line, *header_lines = raw[:-4].decode("latin-1").split("\r\n")
            version, _, rest = status_line.partition(" ")
            if not version.startswith("HTTP/1."):
                raise ProtocolError(f"not an HTTP/1.x response: {status_line[:60]!r}")
            try:
                status = int(rest[:3])
            except ValueError:
                raise ProtocolError(f"bad status line {status_line[:60]!r}") from None
            if status == 101:
                raise ProtocolError("the server switched protocols")
            if 100 <= status < 200:  # an interim response: the real one follows
                interim = True
                continue
            headers: dict[str, str] = {}
            for line in header_lines:
                name, colon, value = line.partition(":")
                if colon:
                    name, value = name.strip().lower(), value.strip()
                    headers[name] = f"{headers[name]}, {value}" if name in headers else value
            connection = headers.get("connection", "").lower()
            keep_alive = (
                "close" not in connection
                and (version != "HTTP/1.0" or "keep-alive" in connection)
                # Both framings at once: the body's end is in doubt, so the connection goes.
                and not ("transfer-encoding" in headers and "content-length" in headers)
            )
            return Response(reader, status, headers, keep_alive)

    async def aclose(self) -> None:
        """Close every idle connection; connections still in use close when their request ends."""
        self._closed = True
        connections = [c for idle in self._idle.values() for c in idle]
        self._idle.clear()
        for connection in connections:
            connection.close()
        for connection in connections:
            with contextlib.suppress(OSError, ssl.SSLError):
                await connection.writer.wait_closed()


def split_lines(buffer: bytearray, chunk: bytes) -> list[str]:
    """Append `chunk` to `buffer` and take out the complete lines (LF or CRLF endings; an SSE
    stream may also end lines with a lone CR, which no completion server does)."""
    buffer += chunk
    end = buffer.rfind(b"\n")
    if end < 0:
        return []
    complete = bytes(buffer[:end])
    del buffer[: end + 1]
    lines = complete.decode("utf-8", errors="replace").split("\n")  # as httpx's aiter_lines
    return [line.removesuffix("\r") for line in lines]


def rest_of_lines(buffer: bytearray) -> list[str]:
    """The last line of a body that did not end with a line ending, if any."""
    if not buffer:
        return []
    line = bytes(buffer).decode("utf-8", errors="replace").removesuffix("\r")
    buffer.clear()
    return [line]
