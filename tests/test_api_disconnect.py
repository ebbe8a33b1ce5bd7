"""A client that goes away, queued or mid-generation, aborts its engine work at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from api_fixtures import MODEL_NAME, LiveServer, live_server, wait_until

pytestmark = pytest.mark.timeout(60)

# Long enough that nothing finishes by itself during a test: 900 tokens per request.
LONG = {"max_new_tokens": 900, "ignore_eos": True}


@pytest.fixture
def server() -> Iterator[LiveServer]:
    # Two slots, so most of a storm waits in the queue; quick keep-alives reach queued clients.
    with live_server(max_batch_size=2, max_queue_size=64, keepalive_interval=0.05) as running:
        yield running


def assert_all_aborted(server: LiveServer, num_requests: int) -> None:
    """Nothing is left running or waiting, and every request ended by abort."""
    assert wait_until(lambda: server.num_live == 0, timeout=3.0), "requests left in the engine"
    assert wait_until(lambda: len(server.recorder.finished) >= num_requests, timeout=3.0)
    reasons = {finished.finish_reason for finished in server.recorder.finished}
    assert reasons == {"abort"}
    assert all(finished.num_output_tokens < 900 for finished in server.recorder.finished)


async def _drop_after_first_line(client: httpx.AsyncClient, path: str, body: dict) -> str:
    """Open a stream, read one line (a token, or a keep-alive while queued), hang up."""
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line:
                return line
    raise AssertionError("the stream ended before its first line")


async def _storm(url: str, num_clients: int) -> list[str]:
    limits = httpx.Limits(max_connections=num_clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        jobs = []
        for index in range(num_clients):
            if index % 2:
                body = {"model": MODEL_NAME, "prompt": "x", "stream": True, **LONG}
                body["max_tokens"] = body.pop("max_new_tokens")
                jobs.append(_drop_after_first_line(client, "/v1/completions", body))
            else:
                jobs.append(_drop_after_first_line(client, "/stream", {"prompt": "x", **LONG}))
        return await asyncio.gather(*jobs)


def test_abort_streams_dropped_mid_stream_and_in_queue(server: LiveServer) -> None:
    first_lines = asyncio.run(_storm(server.url, 16))
    assert any(line.startswith("data: ") for line in first_lines)  # running ones got a token
    assert ": keep-alive" in first_lines  # queued ones heard only keep-alives
    assert_all_aborted(server, 16)


async def _give_up_waiting(url: str, path: str, body: dict, num_clients: int) -> None:
    # The read timeout is the client hanging up before the answer is ready.
    timeout = httpx.Timeout(30, read=0.3)
    limits = httpx.Limits(max_connections=num_clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one() -> None:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(path, json=body)

        await asyncio.gather(*(one() for _ in range(num_clients)))


def test_abort_generate_when_the_client_gives_up(server: LiveServer) -> None:
    asyncio.run(_give_up_waiting(server.url, "/generate", {"prompt": "x", **LONG}, 5))
    assert_all_aborted(server, 5)


def test_abort_unstreamed_completions_when_the_client_gives_up(server: LiveServer) -> None:
    body = {"model": MODEL_NAME, "prompt": ["x", "y"], "n": 2, "max_tokens": 900}
    body["ignore_eos"] = True
    asyncio.run(_give_up_waiting(server.url, "/v1/completions", body, 2))
    assert_all_aborted(server, 8)


def test_keep_serving_after_a_storm(server: LiveServer) -> None:
    asyncio.run(_storm(server.url, 8))
    assert_all_aborted(server, 8)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/generate", json={"prompt": "x", "max_new_tokens": 3})
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 3
