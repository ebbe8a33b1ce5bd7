"""The load generator's HTTP/1.1 client against a raw TCP server that answers with set bytes:
body framings, keep-alive reuse, a connection the server closed while idle, bad responses, TLS."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from service.bench.client import DRAIN_SECONDS, send_request
from service.bench.http import (
    ConnectError,
    ConnectionPool,
    HttpError,
    ProtocolError,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    length = 0
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return head, body


class RawServer:
    """Counts connections; `answers` are sent in turn, one per request, whatever the request (an
    empty one closes the connection without an answer)."""

    def __init__(self, answers: list[bytes], close_after: bool = False) -> None:
        self.answers = answers
        self.close_after = close_after  # close each connection after one answer
        self.connections = 0
        self.requests: list[tuple[str, bytes]] = []
        self.port = 0
        self.ssl: ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                self.requests.append(await _read_request(reader))
                answer = self.answers.pop(0)
                writer.write(answer)
                await writer.drain()
                if self.close_after or not answer:  # an empty answer: close unanswered
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


def _chunked(*pieces: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    )


async def _get_lines(pool: ConnectionPool, url: str) -> tuple[int, list[str], bool]:
    async with pool.request("POST", url, {"Content-Type": "application/json"}, b"{}") as response:
        lines = [line async for line in response.iter_lines()]
        return response.status, lines, response.reusable


def test_chunked_stream_split_anywhere_and_connection_kept() -> None:
    # Events split mid-line and mid-character across chunks, CRLF and LF endings, no final LF.
    euro = "data: caf\u00e9 \u20ac".encode()
    answer = _chunked(
        b"data: one\r\n\r\nda", b"ta: two\n", b"\n" + euro[:-2], euro[-2:] + b"\n\nend"
    )

    async def main() -> None:
        async with RawServer([answer, answer]) as server:
            pool = ConnectionPool()
            for _ in range(2):
                status, lines, reusable = await _get_lines(pool, server.url)
                assert status == 200 and reusable
                assert lines == [
                    "data: one",
                    "",
                    "data: two",
                    "",
                    "data: caf\u00e9 \u20ac",
                    "",
                    "end",
                ]
            await pool.aclose()
            assert server.connections == 1  # the second request went over the kept connection
            head, body = server.requests[0]
            assert head.startswith("POST /v1/completions HTTP/1.1\r\n")
            assert f"Host: 127.0.0.1:{server.port}\r\n" in head and body == b"{}"

    asyncio.run(main())


def test_content_length_empty_and_close_delimited_bodies() -> None:
    fixed = (
        b"HTTP/1.1 503 Busy\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nbusy, later"
    )
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    until_close = b"HTTP/1.0 200 OK\r\n\r\nthe rest\nof it"

    async def main() -> None:
        async with RawServer([fixed, no_content, until_close]) as server:
            pool = ConnectionPool()
            async with pool.request("GET", server.url) as response:
                assert (response.status, await response.read()) == (503, b"busy, later")
                assert response.headers["content-type"] == "text/plain" and response.reusable
            async with pool.request("GET", server.url) as response:
                assert (response.status, await response.read(), response.reusable) == (
                    204,
                    b"",
                    True,
                )
            status, lines, reusable = await _get_lines(pool, server.url)
            assert (status, lines, reusable) == (200, ["the rest", "of it"], False)
            assert server.connections == 1
            await pool.aclose()

    asyncio.run(main())


def test_skip_a_kept_connection_the_server_closed_while_idle() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with RawServer([ok, ok], close_after=True) as server:
            pool = ConnectionPool()
            for _ in range(2):
                async with pool.request("GET", server.url) as response:
                    assert await response.read() == b"ok"
                await asyncio.sleep(0.05)  # idle: the server's close arrives meanwhile
            assert server.connections == 2 and len(server.requests) == 2
            await pool.aclose()

    asyncio.run(main())


def test_a_kept_connection_closed_unanswered_is_tried_once_more_on_a_new_one() -> None:
    # The server reads the second request on the kept connection and closes it unanswered, as
    # llama-server closes a connection after each stream: the request goes again, on a new one.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with RawServer([ok, b"", ok]) as server:
            pool = ConnectionPool()
            for _ in range(2):
                async with pool.request("POST", server.url, body=b"{}") as response:
                    assert await response.read() == b"ok"
            assert len(server.requests) == 3 and server.connections == 2
            await pool.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        # a new connection closed unanswered: not sent again
        ([b""], "closed before a response"),
        # a kept connection closed after part of an answer: not sent again
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 200 OK\r\nContent-Le"],
         "closed in a response's headers"),
        # an interim answer came first: not sent again
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 100 Continue\r\n\r\n"],
         "closed after an interim response"),
    ],
)  # fmt: skip
def test_never_send_again_after_a_new_connection_or_part_of_an_answer(
    answers: list[bytes], message: str
) -> None:
    async def main() -> None:
        async with RawServer(list(answers)) as server:
            pool = ConnectionPool()
            if len(answers) == 2:
                async with pool.request("POST", server.url, body=b"{}") as response:
                    assert await response.read() == b"ok"
            with pytest.raises(ProtocolError, match=message):
                async with pool.request("POST", server.url, body=b"{}"):
                    pass
            assert len(server.requests) == len(answers) and server.connections == 1
            await pool.aclose()

    asyncio.run(main())


def test_a_body_left_unread_closes_the_connection() -> None:
    answer = _chunked(b"data: one\n\n", b"data: two\n\n")

    async def main() -> None:
        async with RawServer([answer, answer]) as server:
            pool = ConnectionPool()
            async with pool.request("GET", server.url) as response:
                assert response.status == 200  # and its body is left unread
            async with pool.request("GET", server.url) as response:
                assert b"data: two" in await response.read()
            assert server.connections == 2
            await pool.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\nshort", "mid-body"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "before the body's end"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"", "connection closed before a response"),
    ],
)
def test_report_broken_responses(answer: bytes, message: str) -> None:
    async def main() -> None:
        async with RawServer([answer], close_after=True) as server:
            pool = ConnectionPool()
            with pytest.raises(ProtocolError, match=message):
                async with pool.request("GET", server.url) as response:
                    await response.read()
            await pool.aclose()

    asyncio.run(main())


def test_report_refused_connections_and_bad_urls() -> None:
    async def main() -> None:
        async with RawServer([]) as server:
            url = server.url
        pool = ConnectionPool(connect_timeout=5)
        with pytest.raises(ConnectError):
            async with pool.request("GET", url):
                pass
        with pytest.raises(HttpError, match="not an http"):
            async with pool.request("GET", "ftp://example.invalid/"):
                pass

    asyncio.run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_with_a_trusted_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    answer = _chunked(b"data: over tls\n\n")

    async def main() -> None:
        server = RawServer([answer, answer])
        server.ssl = server_context
        async with server:
            url = server.url.replace("http://", "https://")
            trusting = ConnectionPool(ssl_context=ssl.create_default_context(cafile=str(cert)))
            status, lines, reusable = await _get_lines(trusting, url)
            assert (status, lines, reusable) == (200, ["data: over tls", ""], True)
            await trusting.aclose()
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                async with ConnectionPool().request("GET", url):  # the system's trust store
                    pass

    asyncio.run(main())


def test_both_framings_close_the_connection_and_bad_utf8_is_replaced() -> None:
    both = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n"
        b"9\r\ndata: \xff!\n\r\n0\r\n\r\n"
    )

    async def main() -> None:
        async with RawServer([both]) as server:
            pool = ConnectionPool()
            status, lines, reusable = await _get_lines(pool, server.url)
            assert (status, lines, reusable) == (200, ["data: \ufffd!"], False)
            await pool.aclose()

    asyncio.run(main())


def test_a_stream_left_open_after_done_still_counts() -> None:
    event = b'data: {"choices": [{"text": "hi", "finish_reason": "length"}]}\n\n'
    open_body = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(event), event)
        + b"e\r\ndata: [DONE]\n\n\r\n"  # and no end mark: the body stays open
    )

    async def main() -> None:
        async with RawServer([open_body]) as server:
            pool = ConnectionPool()
            started = time.perf_counter()
            result = await send_request(pool, server.url, {"stream": True}, {}, timeout=10)
            assert result.is_ok and len(result.chunk_times) == 1, result.error
            assert result.e2e_latency < 0.5  # timed to [DONE], not to the drain's end
            assert time.perf_counter() - started < DRAIN_SECONDS + 1
            await pool.aclose()
            assert server.connections == 1

    asyncio.run(main())
