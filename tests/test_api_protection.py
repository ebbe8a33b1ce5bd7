"""API keys, CORS, and overload: 429 answered at once while admitted streams complete."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from api_fixtures import MODEL_NAME, LiveServer, live_server

pytestmark = pytest.mark.timeout(60)

KEYS = ["key-one", "key-two"]
GENERATE = {"prompt": "x", "max_new_tokens": 2}


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LiveServer]:
    with live_server(api_keys=KEYS, cors_origins=["https://app.example"]) as running:
        yield running


def test_require_api_key_on_generation_and_tokenizer_routes(keyed_server: LiveServer) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        for path, body in [
            ("/generate", GENERATE),
            ("/stream", GENERATE),
            ("/v1/completions", {"model": MODEL_NAME, "prompt": "x"}),
            ("/tokenize", {"prompt": "x"}),
            ("/detokenize", {"tokens": [1]}),
        ]:
            missing = client.post(path, json=body)
            assert missing.status_code == 401, path
            assert missing.json()["error"]["code"] == "missing_api_key"
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = client.post(path, json=body, headers={"Authorization": "Bearer key-three"})
            assert wrong.status_code == 401, path
            assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        for key in KEYS:
            headers = {"Authorization": f"Bearer {key}"}
            assert client.post("/generate", json=GENERATE, headers=headers).status_code == 200
        # A key given with another scheme is not a bearer token.
        basic = client.post("/generate", json=GENERATE, headers={"Authorization": "Basic key-one"})
        assert basic.status_code == 401


def test_leave_health_ready_and_metrics_open(keyed_server: LiveServer) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        for path in ("/health", "/ready", "/metrics", "/docs"):
            assert client.get(path).status_code == 200, path


def test_authenticate_openai_client_with_its_key(keyed_server: LiveServer) -> None:
    good = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="key-two", max_retries=0)
    completion = good.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    assert len(completion.choices) == 1
    bad = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)


def test_allow_configured_cors_origin_only(keyed_server: LiveServer) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        allowed = client.options(
            "/generate", headers={"Origin": "https://app.example", **preflight}
        )
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options("/generate", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers


def test_need_no_key_and_send_no_cors_headers_by_default() -> None:
    with live_server() as server, httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/generate", json=GENERATE, headers={"Origin": "https://a.example"})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


async def _burst(url: str, num_requests: int) -> list[tuple[int, float, list[str], httpx.Headers]]:
    body = {"prompt": "x", "max_new_tokens": 300, "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> tuple[int, float, list[str], httpx.Headers]:
        started = time.monotonic()
        async with client.stream("POST", "/stream", json=body) as response:
            answered = time.monotonic() - started
            if response.status_code != 200:
                await response.aread()
                return response.status_code, answered, [response.text], response.headers
            lines = [line async for line in response.aiter_lines() if line]
            return response.status_code, answered, lines, response.headers

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(one(client) for _ in range(num_requests)))


@pytest.mark.timeout(90)
def test_answer_429_under_a_burst_while_admitted_streams_complete() -> None:
    with live_server(max_batch_size=1, max_queue_size=1, retry_after=3) as server:
        started = time.monotonic()
        results = asyncio.run(_burst(server.url, 8))
        elapsed = time.monotonic() - started
    statuses = sorted(status for status, *_ in results)
    # One slot and one queue place: at most two of eight fit.
    assert statuses.count(429) >= 6
    assert 200 in statuses
    assert set(statuses) <= {200, 429}
    for status, answered, lines, headers in results:
        if status == 429:
            error = json.loads(lines[0])["error"]
            assert error["code"] == "queue_full"
            assert error["type"] == "rate_limit_error"
            assert headers["retry-after"] == "3"
            assert answered < elapsed / 2  # refused at once, not after the others finished
        else:
            assert lines[-1] == "data: [DONE]"
            final = json.loads(lines[-2].removeprefix("data: "))
            assert final["finish_reason"] == "length"
            assert final["usage"]["completion_tokens"] == 300
