"""A client that goes away, queued or mid-generation, aborts its engine work at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

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


async def _open(stack: AsyncExitStack, client: httpx.AsyncClient, index: int) -> AsyncIterator[str]:
    """Open a stream (/stream or a streamed completion, by turns), held open by `stack`; its
    non-empty lines."""
    if index % 2:
        body = {"model": MODEL_NAME, "prompt": "x", "stream": True, **LONG}
        body["max_tokens"] = body.pop("max_new_tokens")
        request = client.stream("POST", "/v1/completions", json=body)
    else:
        request = client.stream("POST", "/stream", json={"prompt": "x", **LONG})
    response = await stack.enter_async_context(request)
    assert response.status_code == 200
    return (line async for line in response.aiter_lines() if line)


async def _drain(lines: AsyncIterator[str]) -> None:
    async for _ in lines:  # a reader that keeps up, so its request keeps its slot
        pass


async def _storm(url: str, num_slots: int, num_clients: int) -> list[str]:
    """Streams that fill the slots and keep being read, then streams that must wait; the
    first line of each, and then all hang up at once."""
    limits = httpx.Limits(max_connections=num_clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async with AsyncExitStack() as stack:
            first_lines, readers = [], []
            for index in range(num_slots):
                lines = await _open(stack, client, index)
                first_lines.append(await anext(lines))
                readers.append(asyncio.ensure_future(_drain(lines)))

            async def first_line_of_another(index: int) -> str:
                return await anext(await _open(stack, client, index))

            first_lines += await asyncio.gather(
                *(first_line_of_another(index) for index in range(num_slots, num_clients))
            )
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        return first_lines


def test_abort_streams_dropped_mid_stream_and_in_queue(server: LiveServer) -> None:
    first_lines = asyncio.run(_storm(server.url, 2, 16))
    assert all(line.startswith("data: ") for line in first_lines[:2])  # running: a token
    assert set(first_lines[2:]) == {": keep-alive"}  # queued behind them: only keep-alives
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
    asyncio.run(_storm(server.url, 2, 8))
    assert_all_aborted(server, 8)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/generate", json={"prompt": "x", "max_new_tokens": 3})
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 3
